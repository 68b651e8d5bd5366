"""Where a denoiser's inputs live: pixels, or a VAE's latents normalised one way, recorded once.

    latent = (z - shift) * scale      z: the VAE's latents [B, h, w, C]; shift, scale: scalars or [C]

`data.latent_norm` picks (shift, scale): "vae" (the VAE's own shift_factor / scaling_factor, from
its bundle or from the latent cache's record of the VAE that made it), "channel" (per-channel mean
and 1 / std of a latent cache) or "scale" (data.latent_shift / latent_scale). Training computes it
here (`training_record`), for the data pipeline, the previews and the exported bundle alike; `sample`
decodes with the bundle's record (`check_vae`), so a model is never decoded at another scale than
it was trained at, nor with another VAE.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from ldm_jax import storage
from ldm_jax.models import serialization

NORMS = ("vae", "channel", "scale")


def vae_identity(vae: Any, params: Any) -> dict[str, Any]:
    """What identifies a VAE's latents: its weights' sha256 and its own normalisation factors."""
    return {"weights_sha256": serialization.params_sha256(params), "scaling_factor": float(vae.scaling_factor),
            "shift_factor": float(vae.shift_factor or 0.0)}


def normalisation(data: Mapping[str, Any], vae: Mapping[str, Any] | None, cache: Any = None) -> tuple[Any, Any]:
    """(shift, scale) of `data.latent_norm`: floats, or lists [C] for "channel".

    data: the `data` config section. vae: the `vae_identity` of the VAE encoding on the fly (None when
    latents come from `cache`, a `sources.LatentSource`, which records its own VAE).
    """
    norm = data["latent_norm"]
    if norm not in NORMS:
        raise ValueError(f"data.latent_norm={norm!r}; use one of {NORMS}")
    if norm == "scale":
        return float(data["latent_shift"]), float(data["latent_scale"])
    if norm == "channel":
        if cache is None:
            raise ValueError("data.latent_norm='channel' takes per-channel statistics of a latent cache "
                             "(data.source='latents'); images encoded on the fly have none: use 'vae' or 'scale'")
        mean, std = cache.channel_stats()
        return [float(m) for m in mean], [float(1.0 / s) for s in std]
    identity = cache.meta.get("vae") if cache is not None else vae
    if identity is None:
        where = f"the latent cache data.path={data['path']} does not record the VAE that made it (re-encode it with " \
                "`ldm-jax encode`)" if cache is not None else "there is no VAE (vae.path is unset)"
        raise ValueError(f"data.latent_norm='vae' takes the VAE's scaling_factor, but {where}; or set "
                         "data.latent_norm='scale' and data.latent_scale")
    return float(identity["shift_factor"]), float(identity["scaling_factor"])


def training_record(data: Mapping[str, Any], vae_path: str, vae: Mapping[str, Any] | None, cache: Any = None) -> dict:
    """What a denoiser trained on `data` takes as input, for its bundle's metadata["latents"]:
    {"space": "pixels"} or {"space": "latents", "norm", "shift", "scale", "vae": identity + path}.

    ValueError when the latent cache was made by another VAE than `vae` (vae.path)."""
    if vae is None and cache is None:
        return {"space": "pixels"}
    cached_vae = cache.meta.get("vae") if cache is not None else None
    if vae is not None and cached_vae is not None and cached_vae["weights_sha256"] != vae["weights_sha256"]:
        raise ValueError(f"the latent cache data.path={data['path']} was encoded by the VAE with weights sha256 "
                         f"{cached_vae['weights_sha256'][:16]}..., but vae.path={vae_path} holds weights "
                         f"{vae['weights_sha256'][:16]}...: encode the cache with this VAE, or set vae.path to that one")
    shift, scale = normalisation(data, vae, cache)
    identity = dict(vae or cached_vae or {})
    if vae is not None:
        identity["path"] = os.fspath(storage.path(vae_path))  # absolute; a gs:// URI stays one
    return {"space": "latents", "norm": data["latent_norm"], "shift": shift, "scale": scale, "vae": identity}


def check_vae(record: Mapping[str, Any] | None, vae_path: str, vae: Mapping[str, Any] | None, where: str) -> None:
    """Sampling a bundle with `record` (None: the bundle records nothing, e.g. converted weights) and
    the VAE at vae.path (`vae`: its identity, None when unset): ValueError naming both on a mismatch."""
    if record is None:
        return
    if record["space"] == "pixels":
        if vae is not None:
            raise ValueError(f"{where} was trained in pixel space; vae.path={vae_path} would decode its pixels as "
                             "latents: leave vae.path unset")
        return
    trained = record["vae"].get("weights_sha256")
    if vae is None:
        raise ValueError(f"{where} was trained on the latents of a VAE (weights sha256 {str(trained)[:16]}...): set "
                         "vae.path to that VAE's bundle")
    if trained and trained != vae["weights_sha256"]:
        raise ValueError(f"{where} was trained on the latents of the VAE with weights sha256 {trained[:16]}..."
                         f"{' at ' + record['vae']['path'] if record['vae'].get('path') else ''}, but vae.path="
                         f"{vae_path} holds weights {vae['weights_sha256'][:16]}...")


def as_arrays(record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The record's (shift, scale) as float32 arrays (scalars or [C])."""
    return np.asarray(record["shift"], np.float32), np.asarray(record["scale"], np.float32)
