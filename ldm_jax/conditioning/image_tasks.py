"""Image conditions of a DiT trained to inpaint or to upscale (config `image_task`), shared by
training and sampling: both build the DiT's `y["concat"]` (and `y["noise_level"]`) with these functions.

  "inpaint" (Stable Diffusion inpainting): y["concat"] = [hole, masked-image latents], [B, h, w, 1 + C].
      hole: the mask on the latent grid (1 = to fill; a latent cell is a hole if any of its pixels is);
      the masked image keeps the known pixels and sets the hole to 0 (grey), and is encoded like the
      training latents (the frozen VAE, normalised; pixel-space models take it as it is). Training
      masks are random boxes and brush strokes drawn by the data pipeline (`data.inpaint_masks`).
  "upscale" (Stable Diffusion x4 upscaler): y["concat"] = the low-resolution image [B, s, s, 3] in
      [-1, 1], noise-augmented to a level of `augmentation_schedule()` (training: uniform in
      [0, max_noise_level]; sampling: `noise_level`), y["noise_level"] = that level [B]. The DiT
      upsamples it bilinearly to its latent grid. Training makes it from the batch's images by
      area downsampling (`downsample`), which is what a user's low-resolution image should be.

Guidance pairs each sample with the same image conditions (they are not dropped): the null
condition varies only the class label / caption.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from ldm_jax.diffusion import schedules

KINDS = ("inpaint", "upscale")
AUGMENTATION_STEPS = 1000  # levels of the low-res noise-augmentation schedule (linear betas, DDPM)


@functools.lru_cache(maxsize=None)
def augmentation_schedule() -> schedules.DiscreteSchedule:
    """The schedule whose level n noises the low-res condition: x_n = a_n x + s_n eps."""
    return schedules.discrete_schedule("linear", AUGMENTATION_STEPS)


def hole_on_grid(mask: jax.Array, height: int, width: int) -> jax.Array:
    """Pixel mask [B, H, W, 1] (1 = hole) -> [B, height, width, 1]: a cell is a hole where any of its
    pixels is (max-pool by H / height); the known cells are fully known."""
    batch, full_h, full_w, _ = mask.shape
    if full_h % height or full_w % width:
        raise ValueError(f"the mask is {full_h}x{full_w}: not a multiple of the latent grid {height}x{width}")
    blocks = mask.reshape(batch, height, full_h // height, width, full_w // width, 1)
    return jnp.max(blocks, axis=(2, 4))


def masked_images(images: jax.Array, mask: jax.Array) -> jax.Array:
    """images [B, H, W, 3] in [-1, 1], mask [B, H, W, 1] (1 = hole) -> the hole set to 0 (grey)."""
    return images * (1.0 - mask)


def downsample(images: jax.Array, size: int) -> jax.Array:
    """Area downsampling [B, H, W, C] -> [B, size, size, C] (the mean of each H/size block)."""
    batch, height, width, channels = images.shape
    if height % size or width % size:
        raise ValueError(f"image_task.low_res_size={size} does not divide the {height}x{width} images")
    blocks = images.reshape(batch, size, height // size, size, width // size, channels)
    return jnp.mean(blocks, axis=(2, 4))


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """What the `image_task` config section trains: kind ("inpaint" | "upscale"); for "upscale", the
    low-res side (pixels), the largest training augmentation level and the default sampling level
    (their defaults: `ldm_jax/config.py`)."""

    kind: str
    low_res_size: int
    max_noise_level: int
    noise_level: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"image_task.kind={self.kind!r}: allowed values are {KINDS} (or '' for none)")
        if self.kind == "upscale":
            if self.low_res_size < 1:
                raise ValueError(f"image_task.low_res_size={self.low_res_size} must be >= 1")
            for field in ("max_noise_level", "noise_level"):
                if not 0 <= getattr(self, field) < AUGMENTATION_STEPS:
                    raise ValueError(f"image_task.{field}={getattr(self, field)} must lie in [0, {AUGMENTATION_STEPS})")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> "ImageTask | None":
        """The `image_task` section -> ImageTask, or None when `kind` is empty (or no section)."""
        if not config or not config.get("kind"):
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"image_task: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(config))

    def describe(self) -> dict[str, Any]:
        """What a model bundle records (model.json metadata "image_task")."""
        return dataclasses.asdict(self)

    def concat_channels(self, latent_channels: int) -> int:
        """The DiT's concat_channels for this task."""
        return 1 + latent_channels if self.kind == "inpaint" else 3

    def check_model(self, model: Any) -> None:
        """ValueError naming the DiT field that does not fit this task."""
        expected = self.concat_channels(model.in_channels)
        if model.concat_channels != expected:
            raise ValueError(f"image_task.kind={self.kind!r} needs model.concat_channels={expected} "
                             f"({'hole + latent channels' if self.kind == 'inpaint' else 'an RGB image'}); "
                             f"got {model.concat_channels}")
        if model.noise_level_conditioning != (self.kind == "upscale"):
            raise ValueError(f"image_task.kind={self.kind!r} needs model.noise_level_conditioning="
                             f"{self.kind == 'upscale'}")

    def training_conditions(self, batch: Mapping[str, jax.Array], encode: Callable[[jax.Array], jax.Array],
                            latent_hw: tuple[int, int], key: jax.Array) -> dict[str, jax.Array]:
        """The DiT's image conditions for a training batch {"image" [B, H, W, 3], "mask" [B, H, W, 1]
        (inpaint)}; encode: images -> normalised latents [B, h, w, C] (identity in pixel space)."""
        images = batch["image"]
        if self.kind == "inpaint":
            return inpaint_conditions(images, batch["mask"], encode, latent_hw)
        level_key, noise_key = jax.random.split(key)
        levels = jax.random.randint(level_key, images.shape[:1], 0, self.max_noise_level + 1)
        low_res = downsample(images, self.low_res_size)
        return upscale_conditions(low_res, levels, jax.random.normal(noise_key, low_res.shape, low_res.dtype))


def inpaint_conditions(images: jax.Array, mask: jax.Array, encode: Callable[[jax.Array], jax.Array],
                       latent_hw: tuple[int, int]) -> dict[str, jax.Array]:
    """{"concat": [hole on the latent grid, encode(masked images)]} [B, h, w, 1 + C]."""
    hole = hole_on_grid(mask, *latent_hw)
    return {"concat": jnp.concatenate([hole, encode(masked_images(images, mask))], axis=-1)}


def upscale_conditions(low_res: jax.Array, levels: jax.Array, noise: jax.Array) -> dict[str, jax.Array]:
    """{"concat": low_res [B, s, s, 3] noised by `noise` (like it) to `levels` [B] int in
    [0, AUGMENTATION_STEPS), "noise_level": levels as float32}."""
    noised = augmentation_schedule().add_noise(low_res, noise, levels)
    return {"concat": noised, "noise_level": levels.astype(jnp.float32)}
