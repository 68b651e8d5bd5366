"""KL-VAE weights: diffusers / original LDM (SD) checkpoints <-> `AutoencoderKL` params.

Reads, detecting the naming from the keys:
- diffusers folders (`config.json` + `diffusion_pytorch_model.safetensors`, or `.bin`), current
  attention names (`to_q`, `to_out.0`) or the deprecated ones (`query`, `proj_attn`) that older
  hub VAEs such as sd-vae-ft-ema still carry;
- original LDM / CompVis names (`encoder.down.0.block.0.norm1`, `encoder.mid.attn_1.q` as 1x1
  convs, `nin_shortcut`, decoder levels numbered from the full-resolution end), alone or inside a
  full Stable Diffusion checkpoint under `first_stage_model.` (or `vae.`); a Lightning
  `{"state_dict": ...}` wrapper and the `loss.*` training keys of LDM autoencoder checkpoints are
  dropped.
Writes diffusers folders that `diffusers.AutoencoderKL.from_pretrained` loads.

Flax module paths are diffusers' state-dict names with `.k` written `_k` (see
`ldm_jax.models.vae`), so the key map is derived from the model itself: kernel -> weight
(conv HWIO <-> OIHW, dense [in, out] <-> [out, in]), GroupNorm scale -> weight, bias -> bias.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax import storage
from ldm_jax.convert.torch_io import check_state_dict, load_state_dict, save_safetensors
from ldm_jax.models.vae import AutoencoderKL

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")

# diffusers config keys that do not change the network or its latents.
_DIFFUSERS_IGNORED = ("sample_size", "force_upcast")


# ----------------------------------------------------------------------------- config


def module_from_diffusers_config(config: Mapping[str, Any], **module_kwargs: Any) -> AutoencoderKL:
    """`AutoencoderKL` from a diffusers `config.json` dict; `module_kwargs` e.g. `dtype`, `remat`.

    Raises ValueError naming the field for settings this model does not implement.
    """
    config = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    class_name = config.pop("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(
            f"config _class_name={class_name!r} is not supported; expected 'AutoencoderKL'"
        )
    act_fn = config.pop("act_fn", "silu")
    if act_fn not in ("silu", "swish"):
        raise ValueError(f"config act_fn={act_fn!r} is not supported; allowed: 'silu', 'swish'")
    for field in ("latents_mean", "latents_std"):
        if config.pop(field, None) is not None:
            raise ValueError(
                f"config {field} is not supported (only scaling_factor / shift_factor); got a value"
            )
    for field in _DIFFUSERS_IGNORED:
        config.pop(field, None)
    block_types = {
        "down_block_types": config.pop("down_block_types", None),
        "up_block_types": config.pop("up_block_types", None),
    }
    module = AutoencoderKL.from_config(config, **module_kwargs)
    expected = diffusers_config(module)
    for field, value in block_types.items():
        if value is not None and list(value) != expected[field]:
            raise ValueError(
                f"config {field}={list(value)} is not supported; expected {expected[field]}"
            )
    return module


def diffusers_config(module: AutoencoderKL) -> dict[str, Any]:
    """The diffusers `config.json` dict of `module` (inverse of `module_from_diffusers_config`)."""
    config = module.to_config()
    levels = len(config["block_out_channels"])
    config.update(
        _class_name="AutoencoderKL",
        block_out_channels=list(config["block_out_channels"]),
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        act_fn="silu",
    )
    return config


# ----------------------------------------------------------------------------- key names


def _ldm_rules(levels: int) -> tuple[tuple[str, Any], ...]:
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    return (
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (
            r"^decoder\.up\.(\d+)\.block\.",
            lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.",
        ),
        (
            r"^decoder\.up\.(\d+)\.upsample\.",
            lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.",
        ),
        (
            r"^(encoder|decoder)\.mid\.block_(\d+)\.",
            lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.",
        ),
        (
            r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
            lambda m: f"{m[1]}.mid_block.attentions.0.{attn[m[2]]}.",
        ),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    )


_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def to_diffusers_names(state_dict: Mapping[str, Any], levels: int) -> dict[str, np.ndarray]:
    """Brings a loaded VAE state dict to current diffusers names and shapes.

    Unwraps `{"state_dict": ...}`, keeps only the VAE of a full checkpoint (`first_stage_model.`),
    renames LDM or deprecated-diffusers keys, and squeezes 1x1-conv attention weights. Keys it does
    not recognise pass through unchanged (so a later key check reports them).
    """
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    for prefix in CHECKPOINT_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {
                k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)
            }
            break
    if any(re.match(r"^(encoder|decoder)\.(down|up|mid)\.", k) for k in state_dict):
        rules = _ldm_rules(levels)
        state_dict = {
            _rename(k, rules): v for k, v in state_dict.items() if not k.startswith("loss.")
        }
    out = {}
    for key, value in state_dict.items():
        key = re.sub(
            r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.",
            lambda m: f"{m[1]}{_DEPRECATED_ATTENTION[m[2]]}.",
            key,
        )
        value = np.asarray(value)
        if (
            re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", key)
            and value.ndim == 4
            and value.shape[2:] == (1, 1)
        ):
            value = value[:, :, 0, 0]
        out[key] = value
    return out


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _torch_key(path: tuple[str, ...]) -> str:
    *modules, leaf = path
    names = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(names + ["bias" if leaf == "bias" else "weight"])


_HWIO_TO_OIHW, _OIHW_TO_HWIO = (3, 2, 0, 1), (2, 3, 1, 0)


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Conv HWIO -> OIHW; dense [in, out] -> [out, in]; vectors unchanged."""
    return np.transpose(array, _HWIO_TO_OIHW) if array.ndim == 4 else array.T


def _from_torch_layout(array: np.ndarray) -> np.ndarray:
    return np.transpose(array, _OIHW_TO_HWIO) if array.ndim == 4 else array.T


def _abstract_params(module: AutoencoderKL) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    f = module.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, module.in_channels), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    return traverse_util.flatten_dict(nn.unbox(variables["params"]))


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `_to_torch_layout` gives an array of `shape`."""
    return tuple(shape[i] for i in _HWIO_TO_OIHW) if len(shape) == 4 else tuple(reversed(shape))


def _expected_shapes(
    abstract: Mapping[tuple[str, ...], jax.ShapeDtypeStruct],
) -> dict[str, tuple[int, ...]]:
    return {_torch_key(path): _torch_shape(leaf.shape) for path, leaf in abstract.items()}


def params_from_state_dict(
    module: AutoencoderKL, state_dict: Mapping[str, np.ndarray], source: str = "checkpoint"
) -> dict[str, Any]:
    """Unboxed `params` of `module` from a diffusers-named state dict (any loadable naming: run
    `to_diffusers_names` first). Raises `CheckpointMismatchError` listing every mismatch."""
    abstract = _abstract_params(module)
    check_state_dict(state_dict, _expected_shapes(abstract), source)
    flat = {
        path: jnp.asarray(
            _from_torch_layout(np.asarray(state_dict[_torch_key(path)])).astype(leaf.dtype)
        )
        for path, leaf in abstract.items()
    }
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(module: AutoencoderKL, params: Any) -> dict[str, np.ndarray]:
    """diffusers-named float state dict (PyTorch layouts) of `params`; checks they fit `module`."""
    flat = traverse_util.flatten_dict(jax.device_get(nn.unbox(params)))
    state_dict = {_torch_key(path): _to_torch_layout(np.asarray(v)) for path, v in flat.items()}
    check_state_dict(state_dict, _expected_shapes(_abstract_params(module)), "params")
    return state_dict


# ----------------------------------------------------------------------------- files


def vae_from_diffusers(
    path: str | os.PathLike,
    config: Mapping[str, Any] | AutoencoderKL | None = None,
    **module_kwargs: Any,
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Loads a KL-VAE. Returns (module, unboxed params).

    path: a diffusers model folder (config.json + diffusion_pytorch_model.safetensors or .bin),
      or one weights file (.safetensors, or a torch .ckpt/.pt/.bin such as a full SD checkpoint),
      in diffusers or original LDM naming (detected).
    config: overrides the folder's config.json; required for a single file. A diffusers config
      dict (e.g. `ldm_jax.models.vae.SD_VAE_CONFIG`) or an `AutoencoderKL`.
    module_kwargs: non-architecture module fields, e.g. `dtype=jnp.bfloat16`, `remat=True`.
    """
    path = storage.path(path)
    if path.is_dir():
        candidates = [path / name for name in WEIGHTS_NAMES if (path / name).is_file()]
        if not candidates:
            raise FileNotFoundError(
                f"{path}: no weights file; expected one of {list(WEIGHTS_NAMES)}"
            )
        weights = candidates[0]
        if config is None:
            if not (path / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; pass `config=`")
            config = json.loads((path / CONFIG_NAME).read_text())
    elif path.is_file():
        weights = path
        if config is None:
            raise ValueError(
                f"{path} is a single weights file: pass `config=` (a diffusers config dict, e.g. "
                "ldm_jax.models.vae.SD_VAE_CONFIG for Stable Diffusion 1.x/2.x, or an "
                "AutoencoderKL)"
            )
    else:
        raise FileNotFoundError(f"VAE weights not found: {path}")
    if isinstance(config, AutoencoderKL):
        module = config.clone(**module_kwargs)
    else:
        module = module_from_diffusers_config(config, **module_kwargs)
    state_dict = to_diffusers_names(load_state_dict(weights), len(module.block_out_channels))
    return module, params_from_state_dict(module, state_dict, source=str(weights))


def vae_to_diffusers(
    module: AutoencoderKL, params: Any, path: str | os.PathLike, overwrite: bool = False
) -> None:
    """Writes a diffusers `AutoencoderKL` folder: config.json + diffusion_pytorch_model.safetensors.

    A local folder is assembled under a temporary name beside `path` and renamed into place; a gs://
    one gets its weights first and config.json (which importers need) last, after an overwritten
    export's config.json is removed: an interrupted write never leaves a complete-looking folder. An
    existing `path` raises FileExistsError unless `overwrite`.
    """
    write_diffusers_folder(
        path, lambda: (diffusers_config(module), state_dict_from_params(module, params)), overwrite
    )


def write_diffusers_folder(
    path: str | os.PathLike,
    contents: Callable[[], tuple[dict[str, Any], dict[str, np.ndarray]]],
    overwrite: bool = False,
) -> None:
    """Writes a diffusers model folder, config.json + diffusion_pytorch_model.safetensors, from
    `contents() -> (config dict, state dict)` (called after `path` is checked), safely as
    `vae_to_diffusers` describes."""
    path = storage.path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if path.exists():
        others = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
        others = [name for name in others if name not in (CONFIG_NAME, WEIGHTS_NAMES[0])]
        if others:
            raise FileExistsError(f"{path} holds files an export did not write ({', '.join(others[:5])}); "
                                  "it is not replaced: choose another folder")
    config, state_dict = contents()
    config = json.dumps(config, indent=2, sort_keys=True) + "\n"
    if storage.is_remote(path):
        (path / CONFIG_NAME).unlink(missing_ok=True)
        save_safetensors(state_dict, path / WEIGHTS_NAMES[0], metadata={"format": "pt"})
        storage.write_atomic(path / CONFIG_NAME, config.encode())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / CONFIG_NAME).write_text(config)
        save_safetensors(state_dict, tmp / WEIGHTS_NAMES[0], metadata={"format": "pt"})
        tmp.chmod(0o755)
        if path.exists():
            old = pathlib.Path(
                tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
            )
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
