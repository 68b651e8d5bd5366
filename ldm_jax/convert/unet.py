"""diffusers `UNet2DConditionModel` folders <-> `UNet2DConditionModel` params.

`unet_from_diffusers(path)` reads a `unet/` folder (config.json + diffusion_pytorch_model.safetensors
or .bin, through `torch_io`, no code from the file runs; a pipeline folder holding `unet/` works
too); `unet_to_diffusers(module, params, path)` writes one that diffusers loads.

Our module paths are diffusers' state-dict names with `.k` written `_k`, so the key map comes from
the model itself (as for the VAE: kernel -> weight, conv HWIO <-> OIHW, dense [in, out] <-> [out,
in], norm scale -> weight); the shared-layer exceptions are mapped here: fused self-attention qkv
<-> to_q/to_k/to_v, cross-attention q / kv <-> to_q / to_k, to_v, proj <-> to_out.0, fc1/fc2 <->
linear_1/linear_2, class_embedding/embedding_table <-> class_embedding.weight.

Config: diffusers' fields map one to one, except in_channels / out_channels, which become the
latent channels (`out_channels`, halved when it is twice diffusers' `in_channels`: a learned
sigma), `concat_channels` (the rest of diffusers' in_channels) and `noise_level_conditioning`
(a class embedding on a model with concatenated inputs, i.e. the x4 upscaler, or
class_embed_type="timestep"). Values this model does not implement raise a one-line ValueError
naming the config.json field.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from ldm_jax import storage
from ldm_jax.convert.torch_io import check_state_dict, load_state_dict
from ldm_jax.convert.vae import WEIGHTS_NAMES, write_diffusers_folder
from ldm_jax.models.unet import UNet2DConditionModel, example_inputs

CONFIG_NAME = "config.json"
CLASS_NAME = "UNet2DConditionModel"

# config.json field -> the values we implement (the first is diffusers' default).
_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "center_input_sample": (False,),
    "mid_block_scale_factor": (1, 1.0),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embeddings_concat": (False,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "num_attention_heads": (None,),
    "attention_type": ("default",),
    "reverse_transformer_layers_per_block": (None,),
}
# Fields without effect on the network in float32 inference and training.
_IGNORED = ("dropout", "upcast_attention", "addition_embed_type_num_heads", "_diffusers_version",
            "_class_name", "_name_or_path")
# config.json field -> our field, copied (lists become tuples).
_COPIED = (
    "sample_size", "block_out_channels", "down_block_types", "up_block_types", "mid_block_type",
    "layers_per_block", "transformer_layers_per_block", "attention_head_dim",
    "cross_attention_dim", "use_linear_projection", "norm_num_groups", "norm_eps",
    "downsample_padding", "flip_sin_to_cos", "freq_shift", "time_embedding_dim",
    "conv_in_kernel", "conv_out_kernel", "num_class_embeds", "class_embed_type",
    "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
)
# Our defaults are SD1.x's where diffusers' differ from ours; these are diffusers' own.
_DIFFUSERS_DEFAULTS = dict(in_channels=4, out_channels=4, cross_attention_dim=1280,
                           layers_per_block=2, attention_head_dim=8)


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def unet_fields_from_diffusers(config: Mapping[str, Any], source: str = CONFIG_NAME) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config dict -> `UNet2DConditionModel` fields."""
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ValueError(f"{source}: _class_name={config['_class_name']!r} is not {CLASS_NAME!r}")
    known = set(_FIXED) | set(_IGNORED) | set(_COPIED) | {"in_channels", "out_channels"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{source}: field {unknown[0]} is not supported (unknown fields: {unknown})")
    for field, allowed in _FIXED.items():
        value = config.get(field, allowed[0])
        if field == "only_cross_attention" and isinstance(value, list) and not any(value):
            continue
        if value not in allowed:
            raise ValueError(f"{source}: {field}={value!r} is not supported (allowed: {list(allowed)})")
    for field in ("layers_per_block", "cross_attention_dim"):
        if isinstance(config.get(field), list):
            raise ValueError(f"{source}: {field}={config[field]} per level is not supported (one int)")
    layers = config.get("transformer_layers_per_block")
    if isinstance(layers, list) and any(isinstance(v, list) for v in layers):
        raise ValueError(f"{source}: transformer_layers_per_block={layers} nested lists are not supported")
    defaults = dict(_DIFFUSERS_DEFAULTS)
    fields = {k: _tuple(config[k]) for k in _COPIED if k in config}
    for key, value in defaults.items():
        if key in _COPIED:
            fields.setdefault(key, value)
    fields.setdefault("block_out_channels", (320, 640, 1280, 1280))
    fields.setdefault("sample_size", 64)
    fields.setdefault("norm_num_groups", 32)
    if fields["norm_num_groups"] is None:
        raise ValueError(f"{source}: norm_num_groups=None is not supported (GroupNorm needs groups)")
    in_ch = config.get("in_channels", defaults["in_channels"])
    out_ch = config.get("out_channels", defaults["out_channels"])
    learn_sigma = out_ch == 2 * in_ch
    latent = in_ch if learn_sigma else out_ch
    if in_ch < latent:
        raise ValueError(
            f"{source}: in_channels={in_ch} < out_channels={out_ch}: supported are out_channels <= "
            "in_channels (the rest concatenated inputs) or out_channels = 2 x in_channels"
        )
    class_embed = fields.get("class_embed_type") is not None or fields.get("num_class_embeds")
    fields.update(
        in_channels=latent,
        concat_channels=in_ch - latent,
        learn_sigma=learn_sigma,
        noise_level_conditioning=bool(
            fields.get("class_embed_type") == "timestep" or (class_embed and in_ch > latent)
        ),
    )
    return fields


def module_from_diffusers_config(
    config: Mapping[str, Any], source: str = CONFIG_NAME, **overrides: Any
) -> UNet2DConditionModel:
    """The module of a diffusers config dict; `overrides`: further fields (dtype, remat,
    num_time_ids, class_dropout_prob, ...). Unsupported values: ValueError naming the field."""
    fields = unet_fields_from_diffusers(config, source)
    try:
        return UNet2DConditionModel(**{**fields, **overrides})
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def diffusers_config(module: UNet2DConditionModel) -> dict[str, Any]:
    """The diffusers `config.json` dict of `module` (inverse of `module_from_diffusers_config`)."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    config = {field: plain(getattr(module, field)) for field in _COPIED}
    if module.learn_sigma:
        config.update(in_channels=module.in_channels, out_channels=2 * module.in_channels)
    else:
        config.update(in_channels=module.in_channels + module.concat_channels,
                      out_channels=module.in_channels)
    config.update(_class_name=CLASS_NAME, act_fn="silu", only_cross_attention=False)
    return config


# ----------------------------------------------------------------------------- key map

# One param leaf <-> its torch keys: (keys, torch shapes, to_torch(a) -> arrays, from_torch(arrays) -> a)
_Map = tuple[list[str], list[tuple[int, ...]], Callable, Callable]
_EMBEDDERS = ("time_embedding", "class_embedding", "add_embedding")


def _torch_name(module: str) -> str:
    return re.sub(r"_(\d+)$", r".\1", module)


def _leaf_map(path: tuple[str, ...], shape: tuple[int, ...]) -> _Map:
    *modules, leaf = path
    names = [_torch_name(m) for m in modules]
    if names and names[0] in _EMBEDDERS and len(names) > 1:
        names[1] = {"fc1": "linear_1", "fc2": "linear_2"}.get(names[1], names[1])
    prefix = ".".join(names)
    attn = len(modules) >= 2 and modules[-2] in ("attn1", "attn2")
    if names == ["class_embedding"] and leaf == "embedding_table":
        return [f"{prefix}.weight"], [shape], lambda a: [a], lambda ts: ts[0]
    if attn and modules[-1] in ("qkv", "kv"):  # kernel [Din, n, H, Dh]
        base = ".".join(names[:-1])
        din, n, heads, dh = shape
        targets = ("to_q", "to_k", "to_v") if n == 3 else ("to_k", "to_v")
        return (
            [f"{base}.{name}.weight" for name in targets],
            [(heads * dh, din)] * n,
            lambda a: [a[:, i].reshape(din, heads * dh).T for i in range(n)],
            lambda ts: np.stack([w.T.reshape(din, heads, dh) for w in ts], axis=1),
        )
    if attn and modules[-1] == "q":  # kernel [D, H, Dh]
        base = ".".join(names[:-1])
        din, heads, dh = shape
        return (
            [f"{base}.to_q.weight"],
            [(heads * dh, din)],
            lambda a: [a.reshape(din, heads * dh).T],
            lambda ts: ts[0].T.reshape(din, heads, dh),
        )
    if attn and modules[-1] == "proj":  # kernel [H, Dh, D], bias [D]
        base = ".".join(names[:-1]) + ".to_out.0"
        if leaf == "bias":
            return [f"{base}.bias"], [shape], lambda a: [a], lambda ts: ts[0]
        heads, dh, dout = shape
        return (
            [f"{base}.weight"],
            [(dout, heads * dh)],
            lambda a: [a.reshape(heads * dh, dout).T],
            lambda ts: ts[0].T.reshape(heads, dh, dout),
        )
    key = f"{prefix}.{'bias' if leaf == 'bias' else 'weight'}"
    if len(shape) == 4:  # conv HWIO <-> OIHW
        return (
            [key],
            [(shape[3], shape[2], shape[0], shape[1])],
            lambda a: [np.transpose(a, (3, 2, 0, 1))],
            lambda ts: np.transpose(ts[0], (2, 3, 1, 0)),
        )
    if len(shape) == 2:  # dense [in, out] <-> [out, in]
        return [key], [shape[::-1]], lambda a: [a.T], lambda ts: ts[0].T
    return [key], [shape], lambda a: [a], lambda ts: ts[0]


def _abstract_params(module: UNet2DConditionModel) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    variables = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    return traverse_util.flatten_dict(nn.unbox(variables["params"]))


def _maps(module: UNet2DConditionModel) -> dict[tuple[str, ...], _Map]:
    return {path: _leaf_map(path, leaf.shape) for path, leaf in _abstract_params(module).items()}


def expected_shapes(module: UNet2DConditionModel) -> dict[str, tuple[int, ...]]:
    """The diffusers state-dict keys and shapes of `module`."""
    return {k: s for keys, shapes, _, _ in _maps(module).values() for k, s in zip(keys, shapes)}


def params_from_state_dict(
    module: UNet2DConditionModel, state_dict: Mapping[str, np.ndarray], source: str = "checkpoint"
) -> dict[str, Any]:
    """Unboxed float32 params of `module` from a diffusers state dict; every key and shape is
    checked first (`CheckpointMismatchError` lists all problems)."""
    maps = _maps(module)
    check_state_dict(
        state_dict,
        {k: s for keys, shapes, _, _ in maps.values() for k, s in zip(keys, shapes)},
        source,
    )
    flat = {
        path: np.asarray(
            from_torch([np.asarray(state_dict[k], np.float32) for k in keys]), np.float32
        )
        for path, (keys, _, _, from_torch) in maps.items()
    }
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(module: UNet2DConditionModel, params: Any) -> dict[str, np.ndarray]:
    """The diffusers state dict (float32, PyTorch layouts) of `params`; checks they fit `module`."""
    flat = traverse_util.flatten_dict(jax.device_get(nn.unbox(params)))
    maps = _maps(module)
    if set(flat) != set(maps):
        diff = sorted(".".join(p) for p in set(flat) ^ set(maps))
        raise ValueError(f"params do not fit the module: differing paths {diff[:5]}")
    state_dict = {}
    for path, (keys, _, to_torch, _) in maps.items():
        state_dict.update(zip(keys, (np.ascontiguousarray(a, np.float32)
                                     for a in to_torch(np.asarray(flat[path])))))
    check_state_dict(state_dict, expected_shapes(module), "params")
    return state_dict


# ----------------------------------------------------------------------------- folders


def _unet_folder(path: str | os.PathLike):
    folder = storage.path(path)
    if not (folder / CONFIG_NAME).is_file() and (folder / "unet" / CONFIG_NAME).is_file():
        folder = folder / "unet"  # a pipeline folder
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (expected a diffusers unet/ folder)")
    return folder


def unet_from_diffusers(
    path: str | os.PathLike, **overrides: Any
) -> tuple[UNet2DConditionModel, dict[str, Any]]:
    """Loads a diffusers `UNet2DConditionModel` folder -> (module, unboxed float32 params).

    overrides: further module fields, e.g. dtype=jnp.bfloat16, remat=True, num_time_ids=5 (the
    SDXL refiner), class_dropout_prob.
    """
    folder = _unet_folder(path)
    config_path = folder / CONFIG_NAME
    module = module_from_diffusers_config(
        json.loads(config_path.read_text()), str(config_path), **overrides
    )
    weights = next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no weights file; expected one of {list(WEIGHTS_NAMES)}")
    return module, params_from_state_dict(module, load_state_dict(weights), str(weights))


def unet_to_diffusers(
    module: UNet2DConditionModel, params: Any, path: str | os.PathLike, overwrite: bool = False
) -> None:
    """Writes a diffusers `UNet2DConditionModel` folder (config.json + safetensors), as
    `vae_to_diffusers` does (atomic; an existing `path` needs `overwrite`)."""
    write_diffusers_folder(
        path, lambda: (diffusers_config(module), state_dict_from_params(module, params)), overwrite
    )
