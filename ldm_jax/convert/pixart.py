"""PixArt weights from diffusers (`PixArtTransformer2DModel`) into `DiT` params.

`dit_from_diffusers_pixart(path)` reads a diffusers folder (config.json +
diffusion_pytorch_model.safetensors or .bin, or a pipeline folder holding `transformer/`) and
returns a `DiT` with PixArt's configuration: adaLN-single (`adaln="single"`), a caption projection
and cross-attention (`context_dim=caption_channels`), no class labels (`num_classes=0`), learned
sigma when out_channels = 2 * in_channels, and diffusers' position `interpolation_scale`. The
model is then called as `dit.apply({'params': p}, x, t, {"context": caption_embeddings [B, L, Dc],
"context_mask": [B, L] bool})`.

Not supported (ValueError naming the config field): `use_additional_conditions` (PixArt-alpha
1024px's resolution / aspect-ratio embeddings; PixArt-alpha 256/512 and PixArt-Sigma do not use
them), norm settings other than PixArt's (affine-free LayerNorms with eps 1e-6), other
activations, attention without bias, `cross_attention_dim` different from the model width (PixArt
projects captions to that width first).

One behavioural difference: diffusers turns the caption mask into a -10000 attention bias, so a
caption with NO real token attends to all its padding; here such a row attends to nothing. With
at least one real token (T5 always emits EOS) the outputs agree.

Weights are read through `torch_io.load_state_dict` and every key and shape is checked with
`check_state_dict` before converting, so a mismatch is one error listing all problems. diffusers'
separate q/k/v projections are fused into our qkv (self-attention) and kv (cross-attention) kernels.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from ldm_jax import storage
from ldm_jax.convert.dit import _Entry, _linear, diffusers_channels
from ldm_jax.convert.torch_io import check_state_dict, load_state_dict
from ldm_jax.models.dit import DiT

PIXART_CLASS = "PixArtTransformer2DModel"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# DiT fields a PixArt checkpoint fixes (overrides may not change them).
_PIXART_FIELDS = dict(
    adaln="single",
    num_classes=0,
    pooled_dim=None,
    concat_channels=0,
    noise_level_conditioning=False,
    qk_norm=False,
)
# Our fused projection -> the diffusers projections it stacks (in order).
_FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}


def dit_config_from_pixart(config: Mapping[str, Any], source: str = "config.json") -> dict:
    """diffusers `PixArtTransformer2DModel` config -> DiT fields."""
    if config.get("_class_name") != PIXART_CLASS:
        raise ValueError(
            f"{source}: _class_name={config.get('_class_name')!r} is not {PIXART_CLASS!r}"
        )
    required = dict(
        norm_type="ada_norm_single",
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        attention_type="default",
    )
    for field, value in required.items():
        if config.get(field, value) != value:
            raise ValueError(
                f"{source}: {field}={config[field]!r} is not supported (needs {value!r})"
            )
    sample_size = config.get("sample_size", 128)
    additional = config.get("use_additional_conditions")
    if additional or (additional is None and sample_size == 128):  # diffusers' default
        raise ValueError(
            f"{source}: use_additional_conditions (resolution / aspect-ratio embeddings) is not "
            "supported; it must be false"
        )
    heads, head_dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 72)
    width = heads * head_dim
    if config.get("caption_channels") is None:
        raise ValueError(f"{source}: caption_channels (the text-embedding width) must be set")
    if config.get("cross_attention_dim", 1152) != width:
        raise ValueError(
            f"{source}: cross_attention_dim={config.get('cross_attention_dim', 1152)} must equal "
            f"the model width num_attention_heads * attention_head_dim = {width}"
        )
    in_channels, learn_sigma = diffusers_channels(config, source)
    patch_size = config.get("patch_size", 2)
    interpolation_scale = config.get("interpolation_scale") or max(sample_size // 64, 1)
    return dict(
        input_size=sample_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=width,
        depth=config.get("num_layers", 28),
        num_heads=heads,
        num_classes=0,
        class_dropout_prob=0.0,  # no labels; caption dropout is the training data's business
        learn_sigma=learn_sigma,
        context_dim=config["caption_channels"],
        adaln="single",
        pos_interpolation_scale=float(interpolation_scale),
    )


def _layout(model: DiT) -> list[_Entry]:
    """(diffusers key, torch shape, our param path, converter), with q/k/v fused (`_FUSED`)."""
    d, p, dc = model.hidden_size, model.patch_size, model.context_dim
    heads = (model.num_heads, d // model.num_heads)
    mlp = int(d * model.mlp_ratio)
    emb = "adaln_single.emb.timestep_embedder"
    table_path = ("adaLN_modulation", "scale_shift_table")

    def table(w: np.ndarray) -> np.ndarray:  # [k, D] -> our flat [k * D]
        return w.reshape(-1)

    layout: list[_Entry] = [
        (
            "pos_embed.proj.weight",
            (d, model.in_channels, p, p),
            ("x_embedder", "kernel"),
            lambda w: w.transpose(2, 3, 1, 0),
        ),
        ("pos_embed.proj.bias", (d,), ("x_embedder", "bias"), lambda b: b),
        *_linear(f"{emb}.linear_1", ("t_embedder", "fc1"), (256,), (d,)),
        *_linear(f"{emb}.linear_2", ("t_embedder", "fc2"), (d,), (d,)),
        *_linear("adaln_single.linear", ("adaln_single",), (d,), (6 * d,)),
        *_linear("caption_projection.linear_1", ("caption_projection", "fc1"), (dc,), (d,)),
        *_linear("caption_projection.linear_2", ("caption_projection", "fc2"), (d,), (d,)),
        ("scale_shift_table", (2, d), ("final_layer",) + table_path, table),
        *_linear("proj_out", ("final_layer", "linear"), (d,), (p, p, model.out_channels)),
    ]
    for i in range(model.depth):
        src, dst = f"transformer_blocks.{i}", (f"blocks_{i}",)
        layout += [
            (f"{src}.scale_shift_table", (6, d), dst + table_path, table),
            *_linear(f"{src}.attn1.to_qkv", dst + ("attn", "qkv"), (d,), (3, *heads)),
            *_linear(f"{src}.attn1.to_out.0", dst + ("attn", "proj"), heads, (d,)),
            *_linear(f"{src}.attn2.to_q", dst + ("cross_attn", "q"), (d,), heads),
            *_linear(f"{src}.attn2.to_kv", dst + ("cross_attn", "kv"), (d,), (2, *heads)),
            *_linear(f"{src}.attn2.to_out.0", dst + ("cross_attn", "proj"), heads, (d,)),
            *_linear(f"{src}.ff.net.0.proj", dst + ("mlp", "fc1"), (d,), (mlp,)),
            *_linear(f"{src}.ff.net.2", dst + ("mlp", "fc2"), (mlp,), (d,)),
        ]
    return layout


def _unfused(key: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """A layout key and torch shape -> the diffusers keys and shapes it is made of."""
    for fused, parts in _FUSED.items():
        if f".{fused}." in key:
            part_shape = (shape[0] // len(parts),) + shape[1:]
            return {key.replace(fused, part): part_shape for part in parts}
    return {key: shape}


def params_from_pixart(
    state_dict: Mapping[str, np.ndarray], model: DiT, source: str = "checkpoint"
) -> dict:
    """A diffusers PixArt state dict -> `model`'s unboxed float32 params (keys checked first)."""
    differing = [
        f"DiT.{field}={getattr(model, field)!r}"
        for field, value in _PIXART_FIELDS.items()
        if getattr(model, field) != value
    ]
    if differing or model.context_dim is None:
        raise ValueError(
            f"{source}: a PixArt checkpoint needs context_dim set and "
            f"{', '.join(f'{k}={v!r}' for k, v in _PIXART_FIELDS.items())}; got "
            f"{', '.join(differing) or 'DiT.context_dim=None'}"
        )
    layout = _layout(model)
    expected = {}
    for key, shape, _, _ in layout:
        expected.update(_unfused(key, shape))
    check_state_dict(state_dict, expected, source)
    flat = {}
    for key, shape, path, to_ours in layout:
        parts = _unfused(key, shape)
        torch_value = np.concatenate([np.asarray(state_dict[k], np.float32) for k in parts])
        flat[path] = to_ours(torch_value)
    return traverse_util.unflatten_dict(flat)


def dit_from_diffusers_pixart(path: str | os.PathLike, **overrides: Any) -> tuple[DiT, dict]:
    """Loads a diffusers `PixArtTransformer2DModel` folder -> (DiT module, params).

    overrides: further DiT fields (dtype, remat, ...).
    """
    folder = storage.path(path)
    if not (folder / "config.json").is_file() and (folder / "transformer").is_dir():
        folder = folder / "transformer"  # a pipeline folder
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a {PIXART_CLASS} folder)")
    weights = [folder / name for name in WEIGHTS_NAMES if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{folder}: no weights file; expected one of {list(WEIGHTS_NAMES)}")
    config = dit_config_from_pixart(json.loads(config_path.read_text()), str(config_path))
    module = DiT(**{**config, **overrides})
    return module, params_from_pixart(load_state_dict(weights[0]), module, str(weights[0]))
