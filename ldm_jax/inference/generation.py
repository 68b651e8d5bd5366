"""From a trained denoiser (+ VAE) to images: latents -> pixels, grids, PNG files.

`LatentDecoder` maps the denoiser's (normalised) latents back to images in [-1, 1]; with no VAE
(pixel-space diffusion) it is the identity. `Generator` runs a sampler with classifier-free
guidance and decodes, one jit per batch shape; the training previews and `ldm-jax sample` both use it.
It conditions on class labels and/or text (already encoded: `text_encoding`); the null
condition of guidance is the null class and the empty caption's embedding. Given an image (and a
mask) it inpaints or upscales it (`image_tasks`; any model inpaints training-free by RePaint).

Per-sample randomness: sample i of a run with key K draws everything from
`key_i = fold_in(K, i)`, split into (initial noise, sampler steps, label) keys (`sample_keys`);
the stochastic samplers draw its step-s noise from `fold_in(steps_key_i, s)`. So sample i's
randomness is the same whatever batch, batch position, chunk or device layout it is generated in;
its pixels agree to float rounding (XLA blocks each matmul by the per-device batch shape).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from PIL import Image

from ldm_jax import storage
from ldm_jax.conditioning.image_tasks import ImageTask, hole_on_grid, inpaint_conditions, upscale_conditions
from ldm_jax.conditioning.pairs import condition_pair
from ldm_jax.conditioning.text_encoding import text_keys
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.guidance import Guidance
from ldm_jax.diffusion.schedules import DiscreteSchedule, FlowSchedule
from ldm_jax.models.vae import scale_latents

LABEL_MODES = ("random", "balanced")


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

    def encode(self, vae_params: Any, images: jax.Array) -> jax.Array:
        """The inverse: images [B, H, W, 3] in [-1, 1] -> normalised latents [B, h, w, C] (the
        posterior's mode); in pixel space the images themselves."""
        if self.vae is None:
            return images
        posterior = self.vae.apply({"params": vae_params}, images, method=self.vae.encode)
        return scale_latents(posterior.mode(), self.scale, self.shift)


def denoiser(model: Any, params: Any) -> Partial:
    """`denoise_fn(x, t, y)` for the samplers, with params as traced inputs (no recompiles)."""
    return Partial(lambda p, x, t, y: model.apply({"params": p}, x, t, y), params)


def example_conditions(model: Any) -> dict[str, jax.Array] | None:
    """Zeros shaped like the `y` a DiT takes (`model.condition_fields()`), batch 1 and one token,
    for `model.init` / `jax.eval_shape`; None when it takes no condition."""
    height, width = model.sample_shape[-3:-1]
    sizes = {"B": 1, "L": 1, "h": height, "w": width}
    dtypes = {"label": jnp.int32, "context_mask": jnp.bool_}
    conditions = {key: jnp.zeros([sizes.get(d, d) for d in dims], dtypes.get(key, jnp.float32))
                  for key, (_, dims) in model.condition_fields().items()}
    return conditions or None


def sample_keys(key: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The run's `key` and global sample indices [B] -> per-sample (noise, steps, label) keys, each [B]."""
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), 3))(indices)
    return keys[:, 0], keys[:, 1], keys[:, 2]


@functools.partial(jax.jit, static_argnames=("mode", "num_classes"))
def _sample_labels(key, indices, *, mode, num_classes):
    if num_classes == 0:
        return jnp.zeros(indices.shape, jnp.int32)
    if mode == "balanced":
        return (indices % num_classes).astype(jnp.int32)
    label_keys = sample_keys(key, indices)[2]
    return jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes, jnp.int32))(label_keys)


def sample_labels(key: jax.Array, indices: np.ndarray, mode: str, num_classes: int) -> np.ndarray:
    """Class of each sample index [B] -> int32 [B]: "random" = drawn from its label key,
    "balanced" = index mod num_classes (0 for an unconditional model, num_classes = 0)."""
    if mode not in LABEL_MODES:
        raise ValueError(f"labels={mode!r}: allowed values are {LABEL_MODES}")
    return np.asarray(_sample_labels(key, jnp.asarray(indices), mode=mode, num_classes=num_classes))


def grid_labels(rows: int, cols: int, num_classes: int) -> np.ndarray:
    """Labels [rows * cols] of a sample grid, row-major: row r shows class r mod num_classes (0 for
    an unconditional model)."""
    return np.repeat(np.arange(rows, dtype=np.int32) % max(num_classes, 1), cols)


@dataclasses.dataclass(frozen=True)
class Generator:
    """Per-sample keys + conditions -> images: a denoiser backbone (`models/backbones.py`:
    `model(x, t, y)` with `sample_shape`, `num_classes`, `condition_fields()`: y = {"label": [B]} with the
    null class `num_classes`, and/or the text conditions; y = None for an unconditional model), its
    schedule, a sampler, classifier-free guidance and the latent decoder. Hashable: it is the static
    part of one jitted program.

    guidance_scale 1 disables guidance; guidance_interval and guided_channels: see `Guidance`.
    image_task: what the model was trained to take as `y["concat"]` / `y["noise_level"]`
      (`image_tasks.ImageTask`; None: nothing): called with the images to inpaint or upscale.
    jumps: (jump_length, jump_n_sample) of the known-region replacement when inpainting (RePaint,
      `samplers.Inpainting`): any model inpaints so, a trained inpainting model with (·, 1) (its
      concat conditions do the work; the replacement keeps the known latents exact).
    paste_known: when inpainting, the output's known pixels are the input's (diffusers'
      `apply_overlay`); False: as decoded (the decoder blends the hole into its surroundings).
    """

    model: Any
    schedule: DiscreteSchedule | FlowSchedule
    sampler: samplers.SamplerConfig
    decoder: LatentDecoder = LatentDecoder()
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    guided_channels: int | None = None
    image_task: ImageTask | None = None
    jumps: tuple[int, int] = (10, 10)
    paste_known: bool = True

    def __post_init__(self):
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        object.__setattr__(self, "guidance_interval", tuple(float(v) for v in self.guidance_interval))
        if self.sampler.clip_x0 is not None and self.decoder.vae is not None:
            raise ValueError(f"sample.clip_x0={self.sampler.clip_x0} clips the predicted x0 to a pixel range, but this "
                             "model denoises VAE latents, which it would distort: set --config.sample.clip_x0=None")
        if self.guided:
            self.guidance(null_cond=self.model.num_classes)  # validates the settings
            if not ((self.conditional or self.text_keys) and self.model.class_dropout_prob > 0):
                raise ValueError(f"guidance_scale={self.guidance_scale} needs a class-conditional model with a "
                                 "null class (num_classes > 0) or a text-conditioned one, trained with condition "
                                 "dropout (class_dropout_prob > 0); use guidance_scale=1")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], model: Any, schedule: DiscreteSchedule | FlowSchedule,
                    sampler: samplers.SamplerConfig, decoder: LatentDecoder = LatentDecoder(),
                    image_task: ImageTask | None = None) -> "Generator":
        """With the guidance and inpainting fields of a `sample` config section (sample.noise_level,
        when set, replaces the image task's)."""
        trained_inpainting = image_task is not None and image_task.kind == "inpaint"
        jump_n_sample = config["jump_n_sample"] or (1 if trained_inpainting else 10)  # None: see config.py
        if image_task is not None and image_task.kind == "upscale" and config["noise_level"] is not None:
            image_task = dataclasses.replace(image_task, noise_level=config["noise_level"])
        return cls(model, schedule, sampler, decoder, config["guidance_scale"], config["guidance_interval"],
                   config["guided_channels"], image_task, (config["jump_length"], jump_n_sample),
                   config["paste_known"])

    @property
    def conditional(self) -> bool:
        """Whether the model takes class labels."""
        return self.model.num_classes > 0

    @property
    def text_keys(self) -> tuple[str, ...]:
        """The text conditions the model takes (none: not text-conditioned)."""
        return text_keys(self.model)

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def guidance(self, null_cond: Any) -> Guidance:
        return Guidance(self.guidance_scale, null_cond=null_cond, interval=self.guidance_interval,
                        guided_channels=self.guided_channels)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent shape (the backbone's `sample_shape`)."""
        return tuple(self.model.sample_shape)

    def image_shape(self, vae_params: Any) -> tuple[int, ...]:
        """The shape [H, W, C] of one decoded image."""
        latents = jax.ShapeDtypeStruct((1,) + self.latent_shape, jnp.float32)
        return tuple(jax.eval_shape(self.decoder, vae_params, latents).shape[1:])

    def __call__(self, params: Any, vae_params: Any, key: jax.Array, indices: jax.Array,
                 labels: jax.Array, text: Mapping[str, jax.Array] | None = None,
                 null_text: Mapping[str, jax.Array] | None = None, image: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        """key: the run's PRNG key (typed, or raw uint32 [2]); indices [B] int: the samples' global
        indices; labels [B] int (ignored by a model without classes); text: a text-conditioned
        model's conditions `{key: [B, ...]}` (`text_keys`), null_text: the empty caption's (no batch
        axis; needed when guided) -> images [B, H, W, C] float32 in [-1, 1]. Inputs may be sharded
        over the batch (params by the logical rules); the output is sharded like `indices`.

        Inpainting: image [B, H, W, 3] in [-1, 1] (the output's size) and mask [B, H, W, 1]
        (1 = fill, 0 = keep). Upscaling (image_task "upscale"): image [B, s, s, 3], the low-res input."""
        if self.text_keys and (text is None or sorted(text) != sorted(self.text_keys)):
            raise ValueError(f"the DiT takes text {list(self.text_keys)}; got {None if text is None else sorted(text)}")
        if self.text_keys and self.guided and null_text is None:
            raise ValueError("guidance of a text-conditioned DiT needs null_text, the empty caption's embedding")
        self._check_image(image, mask)
        return _generate(self, params, vae_params, key, indices, labels, text, null_text, image, mask)

    def _check_image(self, image: jax.Array | None, mask: jax.Array | None) -> None:
        kind = self.image_task.kind if self.image_task is not None else None
        if kind is not None and image is None:
            raise ValueError(f"this DiT was trained for image_task {kind!r}: it needs the image to {kind}"
                             + (" and the mask" if kind == "inpaint" else ""))
        if image is None:
            if mask is not None:
                raise ValueError("a mask was given without the image to inpaint")
            return
        if mask is None and kind != "upscale":
            raise ValueError("an image was given without a mask, and the DiT was not trained to upscale "
                             f"(its image_task: {kind or 'none'})")
        if mask is not None and kind == "upscale":
            raise ValueError("a mask was given, but the DiT was trained to upscale, not to inpaint")
        if mask is not None and tuple(mask.shape) != tuple(image.shape[:-1]) + (1,):
            raise ValueError(f"the mask is {tuple(mask.shape)}, the image {tuple(image.shape)}: they must be "
                             "the same size")


def _image_conditions(generator: Generator, vae_params, key_per_sample, image, mask):
    """(the DiT's image conditions {"concat", "noise_level"} or {}, the RePaint `Inpainting` or None)."""
    if mask is None:  # upscale; the augmentation noise of sample i comes from its own key
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), image.shape[1:]))(key_per_sample)
        levels = jnp.full(image.shape[:1], generator.image_task.noise_level, jnp.int32)
        return upscale_conditions(image, levels, noise), None
    latent_hw = generator.latent_shape[:2]
    encode = functools.partial(generator.decoder.encode, vae_params)
    cond = {}
    if generator.image_task is not None:  # trained inpainting
        cond = inpaint_conditions(image, mask, encode, latent_hw)
    keep = 1.0 - hole_on_grid(mask, *latent_hw)
    return cond, samplers.Inpainting(encode(image), keep, *generator.jumps)


@functools.partial(jax.jit, static_argnums=0)
def _generate(generator: Generator, params, vae_params, key, indices, labels, text, null_text, image, mask):
    noise_keys, step_keys, label_keys = sample_keys(key, indices)
    noise = jax.vmap(lambda k: jax.random.normal(k, generator.latent_shape))(noise_keys)
    image_cond, inpaint = {}, None
    if image is not None:
        image_cond, inpaint = _image_conditions(generator, vae_params, label_keys, image, mask)
    cond, null = condition_pair(generator.model, labels, text, null_text, shared=image_cond)
    guidance = generator.guidance(null) if generator.guided else None
    latents = samplers.sample(denoiser(generator.model, params), noise, cond or None, schedule=generator.schedule,
                              config=generator.sampler, key=step_keys, guidance=guidance, inpaint=inpaint)
    images = generator.decoder(vae_params, latents)
    if inpaint is not None and generator.paste_known:
        images = mask * images + (1.0 - mask) * image
    return images


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
    """Writes a uint8 [H, W, 3] (or [H, W, 1]) image as PNG, atomically, to a local path or a
    `gs://` URI (`storage.write_atomic`); returns the path."""
    path = os.fspath(path)
    if image.shape[-1] == 1:
        image = image[..., 0]
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="PNG")
    storage.write_atomic(path, encoded.getvalue())
    return path
