"""Per-example transforms: the ADM/DiT center crop, flips, [-1, 1] scaling, latent normalisation,
random inpainting masks.

Everything here is numpy/PIL and runs in grain workers. The grain transforms are small picklable
classes (`mp_prefetch` pickles the pipeline into worker processes); their randomness comes only
from the `np.random.Generator` grain hands to `random_map`, which grain seeds from the pipeline seed
and the element's position in the stream (epoch included), so a resumed pipeline is exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageDraw

INPAINT_MASKS = ("box", "stroke")
# Single-channel PIL modes wider than 8 bits -> the stored value of full intensity. "I" (32-bit ints)
# is how Pillow decodes 16-bit PGM / PPM; int32 TIFFs open as "I" too and are read as 16-bit.
_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_8bit(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """Any PIL image -> a new, loaded PIL image of `mode` ("RGB" or "L"), 8 bits per channel.

    PIL's `convert` clips wide modes to [0, 255] (16-bit images come out white, [0, 1] floats
    black); here the modes of `_FULL_SCALE` are scaled by their range instead: 16-bit integers
    ("I;16*", "I") by 255 / 65535, floats ("F") by 255. Values outside [0, full scale] raise a
    one-line ValueError naming the file (`image.filename`) and its mode; they are never clipped.
    """
    full_scale = _FULL_SCALE.get(image.mode)
    if full_scale is None:
        return image.convert(mode)
    values = np.asarray(image)  # [H, W]
    low, high = values.min(), values.max()
    if not (low >= 0 and high <= full_scale):  # NaN fails too
        name = getattr(image, "filename", "") or "an image"
        raise ValueError(f"{name}: PIL mode {image.mode!r} holds values in [{low}, {high}]; 8-bit conversion "
                         f"takes [0, {full_scale}] (16-bit integers, or floats in [0, 1])")
    grey = np.round(values.astype(np.float64) * (255.0 / full_scale)).astype(np.uint8)
    return Image.fromarray(grey).convert(mode)


def to_pil_rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image of any mode (`to_8bit`) or a uint8 array `[H, W]`,
    `[H, W, 1]` or `[H, W, 3]`."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {array.dtype}")
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        image = Image.fromarray(array)
    return image if image.mode == "RGB" else to_8bit(image, "RGB")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The ADM / DiT center crop: a PIL image of any size -> uint8 `[image_size, image_size, 3]`.

    While the short side is at least twice `image_size`, halve the image with a BOX filter (cheap
    and alias-free); then resize bicubically so the short side is `image_size` (sides rounded);
    then cut the central square (offsets rounded down).
    """
    image = to_pil_rgb(pil_image)
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(
        (round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC
    )
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 `[..., H, W, 3]` in [0, 255] -> float32 in [-1, 1]."""
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def hflip(array: np.ndarray) -> np.ndarray:
    """Mirrors `[..., H, W, C]` left-right (the W axis)."""
    return array[..., ::-1, :]


def normalize_latent(z: np.ndarray, shift: Any, scale: Any) -> np.ndarray:
    """`(z - shift) * scale`; `shift`/`scale`: scalars or per-channel `[C]` (z's last axis)."""
    return (z - np.asarray(shift, np.float32)) * np.asarray(scale, np.float32)


@dataclasses.dataclass(frozen=True)
class CropFlipToUnitRange(grain.transforms.RandomMap):
    """`{"image": PIL | uint8 array, ...}` -> `{"image": float32 [S, S, 3] in [-1, 1], ...}`.

    `center_crop_arr` to S = `image_size`, then, when `random_flip`, a horizontal flip with
    probability 1/2.
    """

    image_size: int
    random_flip: bool

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = center_crop_arr(element["image"], self.image_size)
        if self.random_flip and rng.random() < 0.5:
            image = hflip(image)
        return {**element, "image": to_unit_range(image)}


def random_box(rng: np.random.Generator, size: int) -> np.ndarray:
    """A rectangle with sides uniform in [size / 4, size], anywhere inside: bool [size, size]."""
    height, width = rng.integers(max(size // 4, 1), size + 1, size=2)
    top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
    hole = np.zeros((size, size), bool)
    hole[top:top + height, left:left + width] = True
    return hole


def random_strokes(rng: np.random.Generator, size: int) -> np.ndarray:
    """1-4 brush strokes (LaMa / CM-GAN style): polylines of 2-5 vertices with steps up to size / 2,
    widths in [size / 16, size / 4] pixels, round joints: bool [size, size]."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(1, 5)):
        width = int(rng.integers(max(size // 16, 1), max(size // 4, 2) + 1))
        points = [tuple(rng.uniform(0, size, 2))]
        for _ in range(rng.integers(1, 5)):
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(size / 8, size / 2)
            x, y = points[-1]
            points.append((float(np.clip(x + length * np.cos(angle), 0, size - 1)),
                           float(np.clip(y + length * np.sin(angle), 0, size - 1))))
        draw.line(points, fill=255, width=width, joint="curve")
        for x, y in points:  # round caps
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
    return np.asarray(canvas) > 0


@dataclasses.dataclass(frozen=True)
class RandomInpaintMask(grain.transforms.RandomMap):
    """Adds `"mask"`: float32 [S, S, 1], 1 = the hole to inpaint, 0 = known, of a kind drawn
    uniformly from `kinds` (INPAINT_MASKS: "box" = `random_box`, "stroke" = `random_strokes`)."""

    kinds: tuple[str, ...]
    image_size: int

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        draw = {"box": random_box, "stroke": random_strokes}[self.kinds[rng.integers(len(self.kinds))]]
        return {**element, "mask": draw(rng, self.image_size)[..., None].astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class LatentFromPosterior(grain.transforms.RandomMap):
    """A cached posterior -> one normalised latent.

    Input `{"mean": [V, h, w, C], "std": [V, h, w, C], ...}` where V = 2 when the cache holds the
    latents of the image and of its mirror (V = 1 otherwise). Picks a variant uniformly at random
    when `random_flip` (else variant 0, the unflipped image), draws `z = mean + std * eps` when
    `sample` (else the mode, `z = mean`), and returns `{"latent": float32 [h, w, C]}` plus the
    element's "label" / "caption", with `latent = (z - shift) * scale` (scalar or per-channel `[C]`).
    Cached text embeddings come along (`cached_text`), and then stand for the caption, which is
    left out.
    """

    sample: bool
    random_flip: bool
    shift: Any
    scale: Any

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        mean, std = element["mean"], element["std"]
        variant = int(rng.integers(mean.shape[0])) if self.random_flip else 0
        z = mean[variant].astype(np.float32)
        if self.sample:
            z = z + std[variant].astype(np.float32) * rng.standard_normal(z.shape, np.float32)
        out = {k: v for k, v in element.items() if k in ("label", "caption")}
        text = cached_text(element)
        if text:
            out.pop("caption", None)
        out.update(text, latent=normalize_latent(z, self.shift, self.scale))
        return out


def cached_text(element: dict[str, Any]) -> dict[str, np.ndarray]:
    """A latent record's cached text embeddings, if any: "context" / "pooled" as float32 (from the
    stored dtype), "context_mask" as bool."""
    out = {k: np.asarray(element[k], np.float32) for k in ("context", "pooled") if k in element}
    if "context_mask" in element:
        out["context_mask"] = np.asarray(element["context_mask"], bool)
    return out


@dataclasses.dataclass(frozen=True)
class TokenizeCaption(grain.transforms.Map):
    """`{"caption": str, ...}` -> `{"input_ids": int32 [L], "attention_mask": int32 [L], ...}`, the
    caption encoded by a `CLIPTokenizer` to L = `max_length` tokens (and left out). Elements without
    a caption pass unchanged."""

    tokenizer: Any
    max_length: int

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        if "caption" not in element:
            return element
        out = {k: v for k, v in element.items() if k != "caption"}
        ids, mask = self.tokenizer.encode([element["caption"]], self.max_length)
        return {**out, "input_ids": ids[0], "attention_mask": mask[0]}
