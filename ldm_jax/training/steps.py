"""Pure training steps: `(state, frozen, batch) -> (state, metrics)`, jitted and sharded by the loop.

* `train_step`: the generic update. Gradients of a `loss_fn(params, frozen, batch, key, step)` (optionally
  accumulated over micro-batches inside the one jit), a non-finite guard (a step whose loss, gradients
  or updated state are not finite leaves the state untouched and reports `finite=False`, so the loop can
  stop with the last good state), the optax update and the EMA.
* `DiffusionObjective` + `diffusion_loss_fn`: the denoiser's loss on a batch of latents (cached, or
  encoded on the fly by a frozen VAE), conditioned on labels and/or text (cached embeddings, or
  token ids encoded by a frozen text encoder) and/or images (inpainting, super-resolution:
  `image_tasks`), with condition dropout for classifier-free guidance.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ldm_jax.conditioning.image_tasks import ImageTask
from ldm_jax.conditioning.pairs import condition_pair, drop_conditions
from ldm_jax.conditioning.text_encoding import TEXT_KEYS, text_keys
from ldm_jax.diffusion.objectives import DiffusionObjective
from ldm_jax.training.state import TrainState, apply_gradients, ema_decay_at, tree_all_finite

LossFn = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array, jax.Array], tuple[jax.Array, dict]]


def _split_micro_batches(batch: Mapping[str, jax.Array], steps: int) -> dict[str, jax.Array]:
    """[B, ...] -> [steps, B / steps, ...], micro-batch i = rows i, i + steps, ... so that every
    device keeps its own rows (a batch-sharded array needs no data movement)."""

    def split(x):
        if x.shape[0] % steps:
            raise ValueError(
                f"the per-step batch {x.shape[0]} is not divisible by accumulation_steps={steps}"
            )
        return jnp.swapaxes(x.reshape((x.shape[0] // steps, steps) + x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def loss_and_grads(
    loss_fn: LossFn,
    params: Any,
    frozen: Any,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    accumulation_steps: int,
    step: jax.Array | int = 0,
) -> tuple[dict[str, jax.Array], Any]:
    """Mean loss metrics and gradients over `accumulation_steps` micro-batches of `batch`."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, step=step), has_aux=True)
    if accumulation_steps == 1:
        (loss, metrics), grads = grad_fn(params, frozen, batch, key)
        return {"loss": loss, **metrics}, grads

    def accumulate(carry, inputs):
        micro_batch, index = inputs
        (loss, metrics), grads = grad_fn(params, frozen, micro_batch, jax.random.fold_in(key, index))
        total_metrics, total_grads = carry
        total_metrics = jax.tree_util.tree_map(jnp.add, total_metrics, {"loss": loss, **metrics})
        return (total_metrics, jax.tree_util.tree_map(jnp.add, total_grads, grads)), None

    micro = _split_micro_batches(batch, accumulation_steps)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    metric_shapes = jax.eval_shape(lambda: grad_fn(params, frozen, first, key)[0])
    zero_metrics = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), {"loss": metric_shapes[0], **metric_shapes[1]}
    )
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    (metrics, grads), _ = jax.lax.scan(
        accumulate, (zero_metrics, zero_grads), (micro, jnp.arange(accumulation_steps))
    )
    scale = 1.0 / accumulation_steps
    return jax.tree_util.tree_map(lambda x: x * scale, (metrics, grads))


def train_step(
    state: TrainState,
    frozen: Any,
    batch: Mapping[str, jax.Array],
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    ema_decay: float,
    ema_warmup: bool = False,
    accumulation_steps: int = 1,
    allow: jax.Array | bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on `batch` (all of it: micro-batched when accumulating).

    frozen: parameters the loss reads but does not train (e.g. the VAE encoding images on the fly),
      or None. Returns the new state and scalar metrics: loss (+ the loss's own terms), grad_norm,
      learning_rate, finite (1.0 if the update was applied, 0.0 if it was skipped: a non-finite loss,
      gradient, or updated parameter / optimizer moment / EMA value, e.g. from a huge learning rate).
    allow: a traced bool; False computes the step but applies nothing (finite=0.0): a halted run
      (`training/nonfinite.py`).
    """
    key = jax.random.fold_in(state.rng, state.step)
    metrics, grads = loss_and_grads(loss_fn, state.params, frozen, batch, key, accumulation_steps, state.step)
    grad_norm = optax.tree.norm(grads)
    updated = apply_gradients(state, grads, tx, ema_decay_at(state.step, ema_decay, ema_warmup))
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & tree_all_finite(updated) & allow
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), updated, state)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=learning_rate(state.step),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics


def batch_text(batch: Mapping[str, jax.Array], frozen: Any, model: nn.Module,
               encode_text: Callable[[Any, jax.Array, jax.Array], dict] | None) -> dict[str, jax.Array]:
    """The text conditions `model` takes, from the batch: its cached embeddings, or its token ids
    through `encode_text(frozen["text_encoder"], input_ids, attention_mask)` (not differentiated)."""
    keys = text_keys(model)
    if any(k in batch for k in TEXT_KEYS):
        text = batch
    elif "input_ids" in batch and encode_text is not None:
        text = jax.lax.stop_gradient(encode_text(frozen["text_encoder"], batch["input_ids"], batch["attention_mask"]))
    else:
        raise ValueError(
            f"the DiT takes text ({', '.join(keys)}: model.context_dim={model.context_dim}, pooled_dim="
            f"{model.pooled_dim}) but the batch has {sorted(batch)}: it needs cached text embeddings (a latent "
            "cache made with text.encoder_path) or captions tokenized by text.tokenizer_path and encoded by "
            "text.encoder_path"
        )
    missing = [k for k in keys if k not in text]
    if missing:
        raise ValueError(f"the batch's text embeddings lack {missing}, which the DiT takes")
    return {k: text[k] for k in keys}


def diffusion_loss_fn(
    params: Any,
    frozen: Any,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    step: jax.Array | int = 0,  # noqa: ARG001 - the diffusion loss does not depend on the step
    *,
    model: nn.Module,
    objective: DiffusionObjective,
    encode_images: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None,
    encode_text: Callable[[Any, jax.Array, jax.Array], dict] | None = None,
    image_task: ImageTask | None = None,
) -> tuple[jax.Array, dict]:
    """The denoiser's loss on a batch.

    batch: {"latent": [B, h, w, C]} (already scaled), or {"image": [B, H, W, 3]} encoded by
      `encode_images(frozen["vae"], images, key) -> scaled latents` (None: pixel-space diffusion on
      the images themselves); plus the conditions the model takes (`model.condition_fields()`):
      "label" [B] int (num_classes > 0; ignored otherwise), and text (context_dim / pooled_dim):
      cached "context" [B, L, Dc] / "context_mask" [B, L] / "pooled" [B, Dp], or "input_ids" and
      "attention_mask" [B, L] encoded by `encode_text` (see `batch_text`); with an `image_task`,
      the images (and "mask" [B, H, W, 1] for inpainting) it builds "concat" / "noise_level" from.
    frozen: what the loss reads but does not train, a dict: "vae" and "text_encoder" params for the
      two encoders, "null_text": the empty caption's text conditions (one sample, no batch axis).
    Condition dropout (`conditioning.pairs`): with probability `model.class_dropout_prob` a sample's
    label becomes the null class and its text the empty caption, both at once.
    """
    dropout_key, encode_key, loss_key = jax.random.split(key, 3)
    if "latent" in batch:
        x0 = batch["latent"]
    elif encode_images is not None:
        x0 = jax.lax.stop_gradient(encode_images(frozen["vae"], batch["image"], encode_key))
    else:  # pixel-space diffusion
        x0 = batch["image"]
    text = batch_text(batch, frozen, model, encode_text) if text_keys(model) else None
    labels = batch["label"] if model.num_classes else None
    cond, null = condition_pair(model, labels, text, frozen["null_text"] if text else None)
    if cond and model.class_dropout_prob > 0:
        cond = drop_conditions(dropout_key, cond, null, model.class_dropout_prob)
    if image_task is not None:
        masked_key, augment_key = jax.random.split(jax.random.fold_in(key, 1))

        def encode(images):
            if encode_images is None:
                return images
            return jax.lax.stop_gradient(encode_images(frozen["vae"], images, masked_key))

        cond.update(image_task.training_conditions(batch, encode, x0.shape[1:3], augment_key))

    def denoise(x, t, y):
        return model.apply({"params": params}, x, t, y)

    return objective.loss(denoise, x0, cond or None, loss_key)
