"""Every converter `ldm-jax convert` runs, by name: imports (PyTorch / diffusers / transformers
weights -> a model bundle) and exports (a model bundle -> another framework's format).

    ldm-jax convert --from=<IMPORTERS name> --src=<file or folder> --out=<bundle>
    ldm-jax convert --to=<EXPORTERS name> --src=<bundle> --out=<folder>

A new converter is a function in convert/ and one line here. LPIPS and InceptionV3 weights are read
straight from their `.pth` files where they are used (`vae_loss.lpips_*_path`,
`evaluate.inception_path`), so they need no conversion.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

from ldm_jax.convert import clip, dit, pixart, unet, vae
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.models.vae import AutoencoderKL


@dataclasses.dataclass(frozen=True)
class Importer:
    """source: what --src is. load(src, options) -> (module, params); options: the CLI's
    {"model", "image_size"} (used by the official DiT checkpoints)."""

    source: str
    load: Callable[[str, dict[str, Any]], tuple[nn.Module, Any]]


@dataclasses.dataclass(frozen=True)
class Exporter:
    """module: the bundle class it exports; save(module, params, out, overwrite) writes the folder."""

    module: type[nn.Module]
    target: str
    save: Callable[[nn.Module, Any, str, bool], None]


IMPORTERS: dict[str, Importer] = {
    "vae_diffusers": Importer("a diffusers AutoencoderKL folder (config.json + weights)",
                              lambda src, options: vae.vae_from_diffusers(src)),
    "dit_diffusers": Importer("a diffusers DiTTransformer2DModel folder",
                              lambda src, options: dit.dit_from_diffusers(src)),
    "dit_official": Importer("a facebookresearch/DiT checkpoint (.pt); --model and --image_size name it",
                             lambda src, options: dit.dit_from_official(src, model=options["model"],
                                                                        image_size=options["image_size"])),
    "pixart_diffusers": Importer("a diffusers PixArtTransformer2DModel folder (or its pipeline folder)",
                                 lambda src, options: pixart.dit_from_diffusers_pixart(src)),
    "unet_diffusers": Importer("a diffusers UNet2DConditionModel folder (a Stable Diffusion repo's unet/)",
                               lambda src, options: unet.unet_from_diffusers(src)),
    "clip_transformers": Importer("a transformers CLIPTextModel folder (a Stable Diffusion repo's text_encoder/)",
                                  lambda src, options: clip.clip_text_from_hf(src)),
}

EXPORTERS: dict[str, Exporter] = {
    "vae_diffusers": Exporter(AutoencoderKL, "a diffusers AutoencoderKL folder", vae.vae_to_diffusers),
    "unet_diffusers": Exporter(UNet2DConditionModel, "a diffusers UNet2DConditionModel folder",
                               unet.unet_to_diffusers),
}
