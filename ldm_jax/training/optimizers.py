"""optax optimizers and learning-rate schedules from the config's `optimizer` section.

Fields (every one, with its default, in `ldm_jax/config.py`): name ('adamw' | 'adam' | 'sgd'),
learning_rate, weight_decay, b1, b2, eps, momentum (sgd), schedule ('constant' | 'cosine'),
warmup_steps, total_steps (for 'cosine'), grad_clip_norm (0 = off). Gradient accumulation happens inside the train step (micro-batches in one jit), so that
the EMA and the step counter advance once per real update. DiT's recipe: adamw, lr 1e-4, weight_decay 0, constant.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import optax

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(config: Mapping[str, Any]) -> optax.Schedule:
    """Linear warm-up (if warmup_steps > 0) into a constant or cosine-decayed learning rate."""
    name = config["schedule"]
    if name not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={name!r}: allowed values are {SCHEDULES}")
    lr = float(config["learning_rate"])
    warmup = int(config["warmup_steps"])
    if name == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    total = int(config["total_steps"])
    if total <= warmup:
        raise ValueError(
            f"optimizer.total_steps={total} must exceed optimizer.warmup_steps={warmup} "
            "for the cosine schedule"
        )
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)


# field: (lowest, highest, whether the lowest is allowed); every value must also be finite.
_RANGES = {
    "learning_rate": (0.0, math.inf, False), "weight_decay": (0.0, math.inf, True),
    "b1": (0.0, 1.0, True), "b2": (0.0, 1.0, True), "eps": (0.0, math.inf, True),
    "momentum": (0.0, 1.0, True), "warmup_steps": (0, math.inf, True), "grad_clip_norm": (0.0, math.inf, True),
}


def check_hyperparameters(config: Mapping[str, Any]) -> None:
    """ValueError naming the first field out of its range (`optimizer.learning_rate=-1: ...`)."""
    for field, (low, high, low_allowed) in _RANGES.items():
        value = float(config[field])
        in_range = (value >= low if low_allowed else value > low) and value < high
        if not (math.isfinite(value) and in_range):
            bound = f"in [{low}, {high})" if math.isfinite(high) else f"{'>=' if low_allowed else '>'} {low}"
            raise ValueError(f"optimizer.{field}={config[field]!r}: must be a finite number {bound}")


def make_optimizer(config: Mapping[str, Any]) -> optax.GradientTransformation:
    """The full update: optional global-norm clipping, then the optimizer with its schedule."""
    name = config["name"]
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r}: allowed values are {OPTIMIZERS}")
    check_hyperparameters(config)
    schedule = learning_rate_schedule(config)
    if name == "sgd":
        core = optax.sgd(schedule, momentum=config["momentum"])
    elif name == "adam":
        core = optax.adam(schedule, b1=config["b1"], b2=config["b2"], eps=config["eps"])
    else:
        core = optax.adamw(
            schedule,
            b1=config["b1"],
            b2=config["b2"],
            eps=config["eps"],
            weight_decay=config["weight_decay"],
        )
    clip = float(config["grad_clip_norm"])
    return optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core
