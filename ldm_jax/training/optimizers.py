"""optax optimizers and learning-rate schedules from the config's `optimizer` section.

Fields: name ('adamw' | 'adam' | 'sgd'), learning_rate, weight_decay, b1, b2, eps,
schedule ('constant' | 'cosine'), warmup_steps, total_steps (for 'cosine'), grad_clip_norm
(0 = off). Gradient accumulation happens inside the train step (micro-batches in one jit), so that
the EMA and the step counter advance once per real update. DiT's recipe: adamw, lr 1e-4, weight_decay 0, constant.
"""
from __future__ import annotations

from typing import Any, Mapping

import optax

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(config: Mapping[str, Any]) -> optax.Schedule:
    """Linear warm-up (if warmup_steps > 0) into a constant or cosine-decayed learning rate."""
    name = config.get("schedule", "constant")
    if name not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={name!r}: allowed values are {SCHEDULES}")
    lr = float(config["learning_rate"])
    warmup = int(config.get("warmup_steps", 0))
    if name == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    total = int(config.get("total_steps", 0))
    if total <= warmup:
        raise ValueError(
            f"optimizer.total_steps={total} must exceed optimizer.warmup_steps={warmup} "
            "for the cosine schedule"
        )
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)


def make_optimizer(config: Mapping[str, Any]) -> optax.GradientTransformation:
    """The full update: optional global-norm clipping, then the optimizer with its schedule."""
    name = config.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r}: allowed values are {OPTIMIZERS}")
    schedule = learning_rate_schedule(config)
    if name == "sgd":
        core = optax.sgd(schedule, momentum=config.get("momentum", 0.9))
    elif name == "adam":
        core = optax.adam(schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999), eps=config.get("eps", 1e-8))
    else:
        core = optax.adamw(
            schedule,
            b1=config.get("b1", 0.9),
            b2=config.get("b2", 0.999),
            eps=config.get("eps", 1e-8),
            weight_decay=config.get("weight_decay", 0.0),
        )
    clip = float(config.get("grad_clip_norm", 0.0))
    return optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core
