"""Model bundles for inference: the denoiser, the VAE it was trained with, and the settings it records.

A DiT bundle records its latent space (`latent_space.training_record`) and its diffusion objective;
`latent_decoder` and `trained_diffusion` take them from the bundle, and a config that contradicts
them is a ValueError naming both values.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from ldm_jax import latent_space, storage
from ldm_jax.inference import generation
from ldm_jax.models import serialization
from ldm_jax.models.backbones import BACKBONES
from ldm_jax.models.vae import AutoencoderKL


def require_bundle(path: str, field: str) -> None:
    """FileNotFoundError naming `field` unless `path` is a complete model bundle (`serialization.check_bundle`)."""
    try:
        serialization.check_bundle(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{field}: {error}") from None


def check_backbone(module: Any, path: str, field: str) -> None:
    """ValueError unless `module` is a denoiser backbone (`models.backbones.BACKBONES`)."""
    if type(module) not in {backbone.module for backbone in BACKBONES.values()}:
        raise ValueError(f"{field}={path} holds a {type(module).__name__} bundle; sampling needs a denoiser "
                         f"({', '.join(b.module.__name__ for b in BACKBONES.values())})")


def load_vae(path: str) -> tuple[Any, Any, dict[str, Any]]:
    """A VAE bundle -> (module, params, `latent_space.vae_identity`); ValueError if it holds no VAE."""
    vae, params, _ = serialization.load_model(path)
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"vae.path={path} holds a {type(vae).__name__} bundle, not an AutoencoderKL")
    return vae, params, latent_space.vae_identity(vae, params)


def latent_decoder(config: Any, latents: dict | None, where: str) -> tuple[generation.LatentDecoder, Any, Any]:
    """(decoder, VAE params or None, protocol) for a bundle trained on `latents`
    (`latent_space.training_record`; None: not recorded, e.g. converted weights: the VAE's own factors).
    The VAE is vae.path, or the one the bundle records; a contradiction is a ValueError naming both."""
    recorded = ((latents or {}).get("vae") or {}).get("path", "")
    vae_path = os.fspath(storage.path(config.vae.path or recorded)) if (config.vae.path or recorded) else ""
    identity = None
    if vae_path:
        require_bundle(vae_path, "vae.path" if config.vae.path else f"vae.path (unset: the VAE {where} was trained with)")
        vae, vae_params, identity = load_vae(vae_path)
    latent_space.check_vae(latents, vae_path, identity, where)
    if identity is None:
        return generation.LatentDecoder(), None, "pixel space"
    latents = latents or {"shift": identity["shift_factor"], "scale": identity["scaling_factor"]}
    protocol = {"path": vae_path, "weights_sha256": identity["weights_sha256"], "shift": latents["shift"],
                "scale": latents["scale"], **serialization.module_config(vae)}
    return generation.LatentDecoder(vae, *latent_space.as_arrays(latents)), vae_params, protocol


def trained_diffusion(config: Any, trained: dict | None, where: str) -> Any:
    """The diffusion objective's settings: the bundle's (`trained`), which `config.diffusion` must not
    contradict; the config's when the bundle records none (converted weights)."""
    if trained is None:
        return config.diffusion
    given = json.loads(json.dumps(config.diffusion.to_dict()))
    differing = sorted(k for k in trained if k in given and given[k] != trained[k])
    if differing:
        raise ValueError(f"{where} was trained with " + ", ".join(f"diffusion.{k}={trained[k]!r}" for k in differing)
                         + "; the config says " + ", ".join(f"{given[k]!r}" for k in differing)
                         + " (leave them at the trained values)")
    return ml_collections.ConfigDict(trained)
