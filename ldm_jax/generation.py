"""From a trained denoiser (+ VAE) to images: latents -> pixels, grids, PNG files.

`LatentDecoder` maps the denoiser's (normalised) latents back to images in [-1, 1]; with no VAE
(pixel-space diffusion) it is the identity. `generate` runs a sampler with classifier-free guidance
and decodes, all in one jit per shape.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from PIL import Image

from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.guidance import Guidance
from ldm_jax.diffusion.schedules import DiscreteSchedule, FlowSchedule


@dataclasses.dataclass(frozen=True, eq=False)
class LatentDecoder:
    """latents [B, h, w, C] (normalised: (z - shift) * scale) -> images [B, H, W, 3] in [-1, 1].

    vae: an `AutoencoderKL` module, or None for pixel-space diffusion (latents are images).
    shift, scale: the latent normalisation the denoiser was trained with (scalars or [C]).
    """

    vae: Any = None
    shift: Any = 0.0
    scale: Any = 1.0

    def __call__(self, vae_params: Any, latents: jax.Array) -> jax.Array:
        if self.vae is None:
            return jnp.clip(latents, -1.0, 1.0)
        z = latents / jnp.asarray(self.scale, latents.dtype) + jnp.asarray(self.shift, latents.dtype)
        return jnp.clip(self.vae.apply({"params": vae_params}, z, method=self.vae.decode), -1.0, 1.0)


def denoiser(model: Any, params: Any) -> Partial:
    """`denoise_fn(x, t, y)` for the samplers, with params as traced inputs (no recompiles)."""
    return Partial(lambda p, x, t, y: model.apply({"params": p}, x, t, y), params)


@functools.partial(jax.jit, static_argnames=("model", "decoder", "schedule", "sampler", "guidance"))
def _generate(model, params, decoder, vae_params, noise, labels, key, *, schedule, sampler, guidance):
    """guidance: None or the hashable (scale, interval, guided_channels)."""
    if guidance is not None:
        scale, interval, channels = guidance
        guidance = Guidance(scale, null_cond=jnp.int32(model.num_classes), interval=interval,
                            guided_channels=channels)
    latents = samplers.sample(
        denoiser(model, params), noise, labels, schedule=schedule, config=sampler, key=key, guidance=guidance
    )
    return decoder(vae_params, latents)


def generate(
    model: Any,
    params: Any,
    labels: jax.Array,
    key: jax.Array,
    *,
    schedule: DiscreteSchedule | FlowSchedule,
    sampler: samplers.SamplerConfig,
    decoder: LatentDecoder = LatentDecoder(),
    vae_params: Any = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    guided_channels: int | None = None,
) -> jax.Array:
    """Class-conditional samples: labels [B] int -> images [B, H, W, 3] float32 in [-1, 1].

    The initial noise is drawn per sample from `fold_in(key, i)`, so sample i is the same whatever
    the batch it is generated in. guidance_scale 1 disables classifier-free guidance.
    """
    noise_key, sampler_key = jax.random.split(key)
    shape = (model.input_size, model.input_size, model.in_channels)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), shape))(
        jnp.arange(labels.shape[0])
    )
    guidance = None
    if guidance_scale != 1.0:
        guidance = (float(guidance_scale), tuple(guidance_interval), guided_channels)
    return _generate(model, params, decoder, vae_params, noise, labels, sampler_key,
                     schedule=schedule, sampler=sampler, guidance=guidance)


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255] (rounded), as the ADM evaluator expects."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """[N, H, W, C] -> one [rows * H, cols * W, C] grid, row-major; N must be rows * cols."""
    n, h, w, c = images.shape
    if n % rows:
        raise ValueError(f"{n} images do not fill {rows} rows")
    cols = n // rows
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_png(image: np.ndarray, path: str | os.PathLike) -> str:
    """Writes a uint8 [H, W, 3] (or [H, W, 1]) image as PNG (atomically); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if image.shape[-1] == 1:
        image = image[..., 0]
    tmp = path + ".tmp"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
