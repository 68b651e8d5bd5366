"""Classifier-free guidance: a pure wrapper turning a denoiser + null condition into a guided denoiser.

The conditional and unconditional halves run in ONE denoiser call on a doubled batch. The two
copies of each sample are interleaved (`[x0, x0, x1, x1, ...]`), so a batch sharded over devices
stays sharded the same way with no data movement.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

DenoiseFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Guidance:
    """Classifier-free guidance settings.

    Attributes:
      scale: guidance scale w: `uncond + w·(cond - uncond)` (1 = conditional only).
      null_cond: the "no condition" input, broadcastable to the condition (e.g. DiT's null class
        `num_classes`), a pytree matching the condition's structure.
      interval: (lo, hi) ⊂ [0, 1]: guide only where the noise level `t / time_scale` lies in
        [lo, hi] (1 = pure noise; LightningDiT/REPA guidance intervals); elsewhere the conditional
        output alone is used and the unconditional half is not computed.
      guided_channels: guide only the first k prediction channels (DiT's released sampler guides 3 of
        the 4 latent channels); None = all.
    With a learned-variance denoiser (output channels = 2 × input channels) only the prediction half
    is guided; the variance half comes from the conditional output.
    """

    scale: float
    null_cond: Any
    interval: tuple[float, float] = (0.0, 1.0)
    guided_channels: int | None = None

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise ValueError(f"guidance scale {self.scale} (sample.guidance_scale) must be a finite number")
        lo, hi = self.interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(
                f"Guidance.interval={self.interval!r} must satisfy 0 <= lo <= hi <= 1 "
                "(fractions of the noise level, 1 = pure noise)"
            )
        if self.guided_channels is not None and self.guided_channels < 1:
            raise ValueError(f"Guidance.guided_channels={self.guided_channels} must be None or >= 1")


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """`[B, ...]`, `[B, ...]` -> `[2B, ...]` ordered a0, b0, a1, b1, ..."""
    return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


@dataclasses.dataclass(frozen=True)
class _GuidedDenoiser:
    """The static part of a guided denoiser (hashable, so jit caches on it)."""

    guided_channels: int | None
    full_interval: bool

    def __call__(self, denoise_fn, null_cond, scale, lo, hi, time_scale, x, t, cond):
        level = t / time_scale
        active = (level >= lo) & (level <= hi)  # [B]

        def guided(_):
            null = jax.tree.map(lambda c, n: jnp.broadcast_to(n, jnp.shape(c)).astype(c.dtype), cond, null_cond)
            out = denoise_fn(_interleave(x, x), jnp.repeat(t, 2, axis=0), jax.tree.map(_interleave, cond, null))
            out = out.reshape((x.shape[0], 2) + out.shape[1:])
            cond_out, uncond_out = out[:, 0], out[:, 1]
            channels = out.shape[-1] // 2 if out.shape[-1] == 2 * x.shape[-1] else out.shape[-1]
            k = channels if self.guided_channels is None else self.guided_channels
            if k > channels:
                raise ValueError(f"Guidance.guided_channels={k} exceeds the {channels} prediction channels")
            mixed = uncond_out[..., :k] + scale * (cond_out[..., :k] - uncond_out[..., :k])
            result = jnp.concatenate([mixed.astype(cond_out.dtype), cond_out[..., k:]], axis=-1)
            if self.full_interval:
                return result
            return jnp.where(jnp.reshape(active, (-1,) + (1,) * (result.ndim - 1)), result, cond_out)

        if self.full_interval:
            return guided(None)
        return jax.lax.cond(jnp.any(active), guided, lambda _: denoise_fn(x, t, cond), None)


def classifier_free_guidance(denoise_fn: DenoiseFn, guidance: Guidance, time_scale: float = 1.0) -> DenoiseFn:
    """Returns the guided `denoise_fn(x, t, cond)`.

    Args:
      denoise_fn: `(x: [B, ...], t: [B], cond) -> prediction [B, ..., C or 2C]`. A
        `jax.tree_util.Partial` (e.g. `Partial(apply_fn, params)`) keeps its arrays as traced inputs.
      guidance: the settings.
      time_scale: the denoiser's time of pure noise (`schedule.time_scale`), for the interval.
    Returns a `jax.tree_util.Partial`: a pytree whose leaves are the wrapped denoiser's arrays, the null
    condition, the scale and the interval, so changing any of them does not recompile a jitted sampler.
    """
    if not isinstance(denoise_fn, Partial):
        denoise_fn = Partial(denoise_fn)
    lo, hi = guidance.interval
    static = _GuidedDenoiser(guidance.guided_channels, full_interval=(lo, hi) == (0.0, 1.0))
    as_f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return Partial(static, denoise_fn, guidance.null_cond, as_f32(guidance.scale), as_f32(lo), as_f32(hi),
                   as_f32(time_scale))
