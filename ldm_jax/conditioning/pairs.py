"""The (condition, null condition) pair a denoiser is trained and sampled with: the one builder
both the train step (condition dropout) and the sampler (classifier-free guidance) use.

cond: {name: [B, ...]}: "label" [B] int (a model with num_classes > 0) and the text conditions the
  model takes (`text_encoding.text_keys`), plus image conditions (`image_tasks`), which are shared:
  the null condition keeps them, it varies only the label / caption.
null: {name: one sample's value, no batch axis}: the null class `num_classes` for "label", the empty
  caption's embedding for the text keys, the shared image conditions themselves.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ldm_jax.conditioning.text_encoding import text_keys


def condition_pair(model: Any, labels: jax.Array | None = None, text: Mapping[str, jax.Array] | None = None,
                   null_text: Mapping[str, jax.Array] | None = None,
                   shared: Mapping[str, jax.Array] | None = None) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """(cond, null) for `model` (a backbone: `num_classes`, `condition_fields()`).

    labels [B]: used when the model takes classes; text: the model's text conditions {key: [B, ...]}
    and null_text the empty caption's (no batch axis; needed for guidance and dropout only);
    shared: conditions that are the same in cond and null (image tasks).
    """
    cond: dict[str, jax.Array] = {}
    null: dict[str, Any] = {}
    if model.num_classes:
        cond["label"], null["label"] = labels, jnp.int32(model.num_classes)
    if text_keys(model):
        cond.update(text)
        null.update(null_text or {})
    cond.update(shared or {})
    null.update(shared or {})
    return cond, null


def drop_conditions(key: jax.Array, cond: Mapping[str, jax.Array], null: Mapping[str, Any],
                    prob: float) -> dict[str, jax.Array]:
    """Condition dropout for classifier-free guidance: ONE uniform draw per sample; where it falls
    below `prob`, every condition named in `null` takes its null value at once (shared conditions,
    whose null is themselves, are unchanged).

    cond: {name: [B, ...]}; null: {name: a value broadcastable to one sample's [...]}.
    """
    batch = next(iter(cond.values())).shape[0]
    drop = jax.random.uniform(key, (batch,)) < prob

    def replace(value, null_value):
        null_value = jnp.broadcast_to(jnp.asarray(null_value, value.dtype), value.shape)
        return jnp.where(drop.reshape((-1,) + (1,) * (value.ndim - 1)), null_value, value)

    return {name: replace(value, null[name]) if name in null else value for name, value in cond.items()}
