"""The denoiser backbones, by `model.kind`: the one registry the trainer, the sampler and the CLI
reach a backbone through.

A backbone is a Flax module that maps (x_t [B, *sample_shape], t [B], y) to the prediction
[B, ..., out_channels] and declares:
  * `sample_shape`: the shape of one sample it denoises (`(h, w, C)` for images);
  * `condition_fields()`: the keys of `y` it takes -> (the field enabling it, the expected shape);
  * `num_classes`, `learn_sigma`, `out_channels`;
  * logical axis names on every parameter (`nn.with_logical_partitioning`, mapped to the mesh by
    `parallel/partitioning.py`).
Adding a backbone is a models/ file, its converter and one line in `BACKBONES`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn

from ldm_jax.models.dit import DiT, dit_preset
from ldm_jax.models.unet import UNet2DConditionModel

# The kind a `model` section without `kind` describes.
DEFAULT_KIND = "dit"


@dataclasses.dataclass(frozen=True)
class Backbone:
    """module: the Flax module class; preset(name, **fields) -> module (None: the kind has no presets)."""

    module: type[nn.Module]
    preset: Callable[..., nn.Module] | None = None


BACKBONES: dict[str, Backbone] = {
    "dit": Backbone(DiT, dit_preset),
    "unet": Backbone(UNet2DConditionModel),
}


def module_from_config(cls: type, config: Mapping[str, Any], section: str) -> nn.Module:
    """`cls(**config)`, with unknown fields reported by name."""
    known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{section}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    return cls(**config)


def backbone_from_config(config: Mapping[str, Any]) -> nn.Module:
    """The `model` section -> the denoiser: `kind` (default "dit"; allowed: `BACKBONES`), `preset`
    ("DiT-S/2", ...; "" for none) and any field of the kind's module."""
    fields = dict(config)
    kind = fields.pop("kind", DEFAULT_KIND)
    if kind not in BACKBONES:
        raise ValueError(f"model.kind={kind!r}: allowed values are {sorted(BACKBONES)}")
    backbone = BACKBONES[kind]
    preset = fields.pop("preset", "")
    if preset and backbone.preset is None:
        raise ValueError(f"model.preset={preset!r}: model.kind={kind!r} has no presets")
    module = module_from_config(backbone.module, fields, "model")  # reports unknown fields by name
    return backbone.preset(preset, **fields) if preset else module
