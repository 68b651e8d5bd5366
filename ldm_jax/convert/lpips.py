"""LPIPS-VGG weights: torchvision's VGG16 + the lpips package's linear heads -> `LPIPS` params.

Two files, both supplied by the user (nothing is downloaded):
- `vgg_path`: torchvision's vgg16 state dict (`vgg16-397923af.pth`): `features.{i}.weight|bias` for
  the 13 convs (i = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28); `classifier.*` is ignored;
- `lins_path`: the lpips package's `lpips/weights/v0.1/vgg.pth`: `lin{l}.model.1.weight`, [1, C_l, 1, 1].
Both are read by `torch_io.load_state_dict` (safetensors, or torch zip checkpoints without torch).
The published files predate torch's zip format (torch < 1.6); re-save them once with torch
(`torch.save(torch.load(f), g)`) or as safetensors.

`load_lpips_or_none(config)` is what training calls: it returns None, with a logged reason naming
the config field and file, when the files are not configured or not there, so LPIPS is switched off.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from ldm_jax import storage
from ldm_jax.convert.torch_io import check_state_dict, load_state_dict
from ldm_jax.models.lpips import VGG16_WIDTHS, LPIPS, vgg16_conv_indices

CONFIG_FIELDS = ("lpips_vgg_path", "lpips_lins_path")


def _lin_key(level: int) -> str:
    return f"lin{level}.model.1.weight"


def _expected_shapes(widths: Sequence[int]) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """torch shapes of the VGG features and of the lins for `widths`."""
    vgg, lins, c_in = {}, {}, 3
    for level, (width, block) in enumerate(zip(widths, vgg16_conv_indices())):
        for i in block:
            vgg[f"features.{i}.weight"] = (width, c_in, 3, 3)
            vgg[f"features.{i}.bias"] = (width,)
            c_in = width
        lins[_lin_key(level)] = (1, width, 1, 1)
    return vgg, lins


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch OIHW -> flax HWIO, float32."""
    return np.transpose(np.asarray(weight, np.float32), (2, 3, 1, 0))


def lpips_params_from_state_dicts(
    vgg_state_dict: Mapping[str, np.ndarray],
    lins_state_dict: Mapping[str, np.ndarray],
    widths: Sequence[int] = VGG16_WIDTHS,
    source: str = "LPIPS weights",
) -> dict[str, Any]:
    """Unboxed `LPIPS(widths)` params from the two state dicts (`classifier.*` VGG keys ignored).

    Raises one `CheckpointMismatchError` listing every missing, unexpected or misshaped key.
    """
    vgg_shapes, lin_shapes = _expected_shapes(widths)
    vgg = {k: v for k, v in vgg_state_dict.items() if not k.startswith("classifier.")}
    merged = {**vgg, **{f"lins:{k}": v for k, v in lins_state_dict.items()}}
    expected = {**vgg_shapes, **{f"lins:{k}": s for k, s in lin_shapes.items()}}
    check_state_dict(merged, expected, source)
    params: dict[str, Any] = {}
    for block in vgg16_conv_indices():
        for i in block:
            params[f"features_{i}"] = {
                "kernel": _conv_kernel(vgg[f"features.{i}.weight"]),
                "bias": np.asarray(vgg[f"features.{i}.bias"], np.float32),
            }
    for level in range(len(widths)):
        params[f"lin{level}"] = {"kernel": _conv_kernel(lins_state_dict[_lin_key(level)])}
    return params


def lpips_from_torch(
    vgg_path: str | os.PathLike,
    lins_path: str | os.PathLike,
    widths: Sequence[int] = VGG16_WIDTHS,
    dtype: Any = jnp.float32,
) -> tuple[LPIPS, dict[str, Any]]:
    """(LPIPS module, unboxed params) from torchvision's vgg16 file and lpips' `v0.1/vgg.pth`.

    `widths` are VGG16's unless a reduced test network is loaded; `dtype` is the compute dtype.
    """
    module = LPIPS(widths=tuple(widths), dtype=dtype)
    source = f"LPIPS weights ({os.fspath(vgg_path)} + {os.fspath(lins_path)}; lin keys prefixed 'lins:')"
    params = lpips_params_from_state_dicts(
        load_state_dict(vgg_path), load_state_dict(lins_path), module.widths, source
    )
    return module, params


def load_lpips_or_none(config: Mapping[str, Any], dtype: Any = jnp.float32) -> tuple[LPIPS, dict[str, Any]] | None:
    """LPIPS for the VAE loss from `config.lpips_vgg_path` / `config.lpips_lins_path`, or None.

    config: the loss section of the training config. Returns None, logging a warning that names the
    unset field or the missing file, when LPIPS cannot be built from user-supplied files; the loss
    then has no perceptual term. Files that exist but do not match raise (a wrong file is an error).
    """
    problems = []
    for field in CONFIG_FIELDS:
        path = config.get(field) or ""
        if not path:
            problems.append(f"config field {field} is not set")
        elif not storage.path(path).is_file():
            problems.append(f"{field}={os.fspath(path)!r}: file not found")
    if problems:
        logging.warning(
            "LPIPS perceptual loss is OFF: %s. To enable it, set %s to torchvision's vgg16 state dict "
            "(vgg16-397923af.pth) and %s to the lpips package's weights/v0.1/vgg.pth "
            "(zip-format torch files or safetensors).",
            "; ".join(problems), *CONFIG_FIELDS,
        )
        return None
    return lpips_from_torch(config[CONFIG_FIELDS[0]], config[CONFIG_FIELDS[1]], dtype=dtype)
