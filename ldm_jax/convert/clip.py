"""Hugging Face `CLIPTextModel` weights -> `CLIPTextEncoder` params.

Reads a transformers folder (a Stable Diffusion repo's `text_encoder/`): `config.json` +
`model.safetensors` (or a torch `pytorch_model.bin`, read without torch by `torch_io`). Keys may
carry transformers 4's `text_model.` prefix (the SD repos) or not (transformers 5); the
non-persistent `embeddings.position_ids` buffer older files hold is ignored. Every other key must
match the model: one `CheckpointMismatchError` lists all missing, unexpected and misshaped keys.

Layouts: torch Linear weight [out, in] -> kernel [in, out] reshaped to the kernel's head split
(q/k/v_proj [D, H, Dh], out_proj [H, Dh, D]); embeddings and LayerNorm weights unchanged
(LayerNorm weight -> scale).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax import storage
from ldm_jax.convert.torch_io import check_state_dict, load_state_dict
from ldm_jax.models.clip import CLIPTextEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
KEY_PREFIX = "text_model."
IGNORED_KEYS = ("embeddings.position_ids",)

# transformers' CLIPTextConfig defaults, for keys a config.json leaves out.
HF_CONFIG_DEFAULTS: Mapping[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}


def module_from_hf_config(config: Mapping[str, Any], **module_kwargs: Any) -> CLIPTextEncoder:
    """`CLIPTextEncoder` from a transformers `CLIPTextConfig` dict; `module_kwargs` e.g. `dtype`.

    Raises ValueError naming the field for configs that are not a CLIP text tower.
    """
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model" or "text_config" in config:
        raise ValueError(
            f"config model_type={model_type!r} is not supported; expected 'clip_text_model' "
            "(the text_encoder/ folder of a Stable Diffusion repo)"
        )
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if architectures != ["CLIPTextModel"]:
        raise ValueError(
            f"config architectures={architectures} is not supported; expected ['CLIPTextModel']"
        )
    fields = {k: config.get(k, default) for k, default in HF_CONFIG_DEFAULTS.items()}
    return CLIPTextEncoder(**fields, **module_kwargs)


def _torch_key(path: tuple[str, ...]) -> str:
    *modules, leaf = path
    name = ".".join(re.sub(r"_(\d+)$", r".\1", m) for m in modules)
    if name.startswith("layers."):
        name = f"encoder.{name}"
    elif name.endswith("_embedding"):
        name = f"embeddings.{name}"
    return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"


def _in_dims(path: tuple[str, ...]) -> int:
    """Leading kernel dimensions that are the torch Linear's input (out_proj: heads and Dh)."""
    return 2 if path[-2] == "out_proj" else 1


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        k = _in_dims(path)
        return (math.prod(shape[k:]), math.prod(shape[:k]))
    if path[-1] == "bias":  # q/k/v biases are [H, Dh]
        return (math.prod(shape),)
    return tuple(shape)


def _abstract_params(module: CLIPTextEncoder) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(module.init, jax.random.key(0), ids)
    return traverse_util.flatten_dict(nn.unbox(variables["params"]))


def to_hf_names(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Strips the `text_model.` prefix (when the keys have it) and drops the position_ids buffer."""
    if any(k.startswith(KEY_PREFIX) for k in state_dict):
        state_dict = {
            k[len(KEY_PREFIX) :] if k.startswith(KEY_PREFIX) else k: v
            for k, v in state_dict.items()
        }
    return {k: np.asarray(v) for k, v in state_dict.items() if k not in IGNORED_KEYS}


def params_from_state_dict(
    module: CLIPTextEncoder, state_dict: Mapping[str, np.ndarray], source: str = "checkpoint"
) -> dict[str, Any]:
    """Unboxed params of `module` from a transformers-named state dict (run `to_hf_names` first).
    Raises `CheckpointMismatchError` listing every mismatch."""
    abstract = _abstract_params(module)
    expected = {_torch_key(p): _torch_shape(p, leaf.shape) for p, leaf in abstract.items()}
    check_state_dict(state_dict, expected, source)
    flat = {}
    for path, leaf in abstract.items():
        value = np.asarray(state_dict[_torch_key(path)])
        if path[-1] == "kernel":
            value = value.T
        flat[path] = jnp.asarray(value.reshape(leaf.shape).astype(leaf.dtype))
    return traverse_util.unflatten_dict(flat)


def clip_text_from_hf(
    path: str | os.PathLike, **module_kwargs: Any
) -> tuple[CLIPTextEncoder, dict[str, Any]]:
    """Loads a transformers `CLIPTextModel` folder. Returns (module, unboxed params).

    path: config.json + model.safetensors (or pytorch_model.bin), e.g. a Stable Diffusion repo's
      `text_encoder/`.
    module_kwargs: non-architecture fields, e.g. `dtype=jnp.bfloat16`.
    """
    path = storage.path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP text encoder folder not found: {path}")
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}")
    candidates = [path / name for name in WEIGHTS_NAMES if (path / name).is_file()]
    if not candidates:
        raise FileNotFoundError(f"{path}: no weights file; expected one of {list(WEIGHTS_NAMES)}")
    module = module_from_hf_config(json.loads((path / CONFIG_NAME).read_text()), **module_kwargs)
    state_dict = to_hf_names(load_state_dict(candidates[0]))
    return module, params_from_state_dict(module, state_dict, source=str(candidates[0]))
