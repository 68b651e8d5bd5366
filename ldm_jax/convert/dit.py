"""DiT weights from the official facebookresearch checkpoints and from diffusers, into `DiT` params.

- `dit_from_official(path, model="DiT-XL/2", ...)`: a `torch.save`d `.pt` as released
  (DiT-XL-2-256x256.pt: a plain state dict) or written by the reference train.py
  ({'model', 'ema', 'opt', 'args'}; `weights` picks 'ema' or 'model').
- `dit_from_diffusers(path)`: a `DiTTransformer2DModel` folder (config.json + safetensors, or a
  pipeline folder holding `transformer/`). diffusers keeps a copy of the timestep and label
  embedders in every block; they are checked to be identical and collapsed. Its two semantic
  differences (`timestep_freq_shift=1`, `mlp_norm_eps=norm_eps`) are set on the returned module.

Both read through `torch_io.load_state_dict` (no code from the file runs) and check every key and
shape with `check_state_dict` before converting, so a mismatch is one error listing all problems.
diffusers weights are first renamed to the official layout; one table maps that layout to ours.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

from etils import epath
import numpy as np

from ldm_jax import storage
from ldm_jax.convert.torch_io import check_state_dict, load_state_dict
from ldm_jax.models.dit import DiT, dit_preset
from ldm_jax.models.layers import sincos_pos_embed_2d

# (official key, torch shape, our param path, torch array -> our array)
_Entry = tuple[str, tuple[int, ...], tuple[str, ...], Callable[[np.ndarray], np.ndarray]]

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
# Official key fragment <-> diffusers key fragment, applied in order (reversed for diffusers ->
# official); the fused qkv (split into to_q/to_k/to_v) and the embedders are handled apart.
_RENAMES = (
    ("x_embedder.proj.", "pos_embed.proj."),
    ("final_layer.adaLN_modulation.1.", "proj_out_1."),
    ("final_layer.linear.", "proj_out_2."),
    ("blocks.", "transformer_blocks."),
    (".adaLN_modulation.1.", ".norm1.linear."),
    (".attn.proj.", ".attn1.to_out.0."),
    (".attn.qkv.", ".attn1.qkv."),
    (".mlp.fc1.", ".ff.net.0.proj."),
    (".mlp.fc2.", ".ff.net.2."),
)
# Official embedder key -> the key diffusers repeats in each block (transformer_blocks.i.norm1.emb.)
_EMBEDDERS = {
    "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}


def _linear(
    src: str, dst: tuple[str, ...], fan_in: tuple[int, ...], fan_out: tuple[int, ...]
) -> list[_Entry]:
    """A torch Linear [out, in] -> our kernel [*fan_in, *fan_out] and bias [*fan_out]."""
    n_in, n_out = int(np.prod(fan_in)), int(np.prod(fan_out))
    return [
        (
            f"{src}.weight",
            (n_out, n_in),
            dst + ("kernel",),
            lambda w: w.T.reshape(fan_in + fan_out),
        ),
        (f"{src}.bias", (n_out,), dst + ("bias",), lambda b: b.reshape(fan_out)),
    ]


def _official_layout(model: DiT) -> list[_Entry]:
    d, p, c = model.hidden_size, model.patch_size, model.in_channels
    heads, mlp = model.num_heads, int(model.hidden_size * model.mlp_ratio)
    vocab = model.num_classes + int(model.class_dropout_prob > 0)
    layout: list[_Entry] = [
        (
            "x_embedder.proj.weight",
            (d, c, p, p),
            ("x_embedder", "kernel"),
            lambda w: w.transpose(2, 3, 1, 0),
        ),
        ("x_embedder.proj.bias", (d,), ("x_embedder", "bias"), lambda b: b),
        (
            "y_embedder.embedding_table.weight",
            (vocab, d),
            ("y_embedder", "embedding_table"),
            lambda w: w,
        ),
        *_linear("t_embedder.mlp.0", ("t_embedder", "fc1"), (256,), (d,)),
        *_linear("t_embedder.mlp.2", ("t_embedder", "fc2"), (d,), (d,)),
        *_linear(
            "final_layer.adaLN_modulation.1",
            ("final_layer", "adaLN_modulation", "linear"),
            (d,),
            (2 * d,),
        ),
        *_linear("final_layer.linear", ("final_layer", "linear"), (d,), (p, p, model.out_channels)),
    ]
    for i in range(model.depth):
        src, dst = f"blocks.{i}", (f"blocks_{i}",)
        layout += [
            *_linear(
                f"{src}.adaLN_modulation.1", dst + ("adaLN_modulation", "linear"), (d,), (6 * d,)
            ),
            *_linear(f"{src}.attn.qkv", dst + ("attn", "qkv"), (d,), (3, heads, d // heads)),
            *_linear(f"{src}.attn.proj", dst + ("attn", "proj"), (heads, d // heads), (d,)),
            *_linear(f"{src}.mlp.fc1", dst + ("mlp", "fc1"), (d,), (mlp,)),
            *_linear(f"{src}.mlp.fc2", dst + ("mlp", "fc2"), (mlp,), (d,)),
        ]
    return layout


def _check_convertible(model: DiT) -> None:
    if model.qk_norm:
        raise ValueError("DiT.qk_norm=True has no counterpart in official or diffusers checkpoints")


def params_from_official(
    state_dict: Mapping[str, np.ndarray], model: DiT, source: str = "checkpoint"
) -> dict:
    """Official-layout state dict (pos_embed optional) -> `model`'s unboxed float32 params."""
    _check_convertible(model)
    layout = _official_layout(model)
    grid = model.input_size // model.patch_size
    pos_shape = (1, grid * grid, model.hidden_size)
    expected = {key: shape for key, shape, _, _ in layout}
    if "pos_embed" in state_dict:
        expected["pos_embed"] = pos_shape
    check_state_dict(state_dict, expected, source)
    if "pos_embed" in state_dict:
        ours = sincos_pos_embed_2d(model.hidden_size, grid, grid)
        if not np.allclose(
            np.asarray(state_dict["pos_embed"], np.float32)[0], ours, rtol=0, atol=1e-6
        ):
            raise ValueError(
                f"{source}: pos_embed is not the fixed 2D sin-cos embedding DiT computes"
            )
    params: dict[str, Any] = {}
    for key, _, path, to_ours in layout:
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = to_ours(np.asarray(state_dict[key], dtype=np.float32))
    return params


def _select_weights(
    checkpoint: Mapping[str, Any], weights: str, source: str
) -> Mapping[str, np.ndarray]:
    if weights not in ("ema", "model"):
        raise ValueError(f"weights={weights!r} must be 'ema' or 'model'")
    if "ema" not in checkpoint and "model" not in checkpoint:
        return checkpoint  # a plain state dict, as released
    if weights not in checkpoint:
        raise ValueError(
            f"{source}: training checkpoint has no {weights!r} entry (has {sorted(checkpoint)})"
        )
    return checkpoint[weights]


def dit_from_official(
    path: str | os.PathLike,
    model: str = "DiT-XL/2",
    image_size: int = 256,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    weights: str = "ema",
    **overrides: Any,
) -> tuple[DiT, dict]:
    """Loads a facebookresearch/DiT `.pt` -> (DiT module, params).

    model: preset name ("DiT-XL/2", ...); image_size: pixels (latent input_size = image_size // 8);
    weights: 'ema' or 'model' entry of a training checkpoint (ignored for a plain state dict);
    overrides: further DiT fields (dtype, remat, or sizes for non-preset models).
    """
    if image_size % 8:
        raise ValueError(f"image_size={image_size} must be divisible by 8 (the VAE downsampling)")
    source = os.fspath(path)
    module = dit_preset(
        model,
        input_size=image_size // 8,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        **overrides,
    )
    state_dict = _select_weights(load_state_dict(path), weights, source)
    return module, params_from_official(state_dict, module, source)


# ----------------------------------------------------------------------------- diffusers



def diffusers_channels(config: Mapping[str, Any], source: str) -> tuple[int, bool]:
    """A diffusers transformer config's (in_channels, learn_sigma): out_channels must be in_channels
    (epsilon) or twice it (epsilon + learned sigma)."""
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"{source}: out_channels={out_channels} must be in_channels={in_channels} or twice it")
    return in_channels, out_channels == 2 * in_channels

def dit_config_from_diffusers(
    config: Mapping[str, Any], source: str = "config.json"
) -> dict[str, Any]:
    """diffusers `DiTTransformer2DModel` config -> DiT fields (diffusers semantics)."""
    required = dict(
        norm_type="ada_norm_zero",
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_elementwise_affine=False,
    )
    if config.get("_class_name") not in DIFFUSERS_CLASSES:
        raise ValueError(
            f"{source}: _class_name={config.get('_class_name')!r} is not one of {DIFFUSERS_CLASSES}"
        )
    for field, value in required.items():
        if config.get(field, value) != value:
            raise ValueError(
                f"{source}: {field}={config[field]!r} is not supported (DiT needs {value!r})"
            )
    if config.get("num_embeds_ada_norm") is None:
        raise ValueError(f"{source}: num_embeds_ada_norm (the number of classes) must be set")
    in_channels, learn_sigma = diffusers_channels(config, source)
    heads = config.get("num_attention_heads", 16)
    return dict(
        input_size=config.get("sample_size", 32),
        patch_size=config.get("patch_size", 2),
        in_channels=in_channels,
        hidden_size=heads * config.get("attention_head_dim", 72),
        depth=config.get("num_layers", 28),
        num_heads=heads,
        num_classes=config["num_embeds_ada_norm"],
        class_dropout_prob=0.1,  # diffusers' label embedder always has the null-class row
        learn_sigma=learn_sigma,
        timestep_freq_shift=1.0,
        mlp_norm_eps=config.get("norm_eps", 1e-5),
    )


def _rename(key: str, to_diffusers: bool) -> str:
    for official, diffusers in _RENAMES if to_diffusers else _RENAMES[::-1]:
        key = key.replace(official, diffusers) if to_diffusers else key.replace(diffusers, official)
    return key


def _diffusers_shapes(model: DiT) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of `model` as a diffusers `DiTTransformer2DModel` state dict."""
    expected = {}
    for key, shape, _, _ in _official_layout(model):
        if key in _EMBEDDERS:
            for i in range(model.depth):
                expected[f"transformer_blocks.{i}.norm1.emb.{_EMBEDDERS[key]}"] = shape
        elif ".attn.qkv." in key:
            for name in "qkv":
                expected[_rename(key, True).replace(".qkv.", f".to_{name}.")] = (
                    shape[0] // 3,
                ) + shape[1:]
        else:
            expected[_rename(key, True)] = shape
    return expected


def _official_from_diffusers(state_dict: Mapping[str, np.ndarray], depth: int, source: str) -> dict:
    """Checked diffusers state dict -> official layout; per-block embedders must be identical."""
    official, differing = {}, []
    for key, name in _EMBEDDERS.items():
        copies = [state_dict[f"transformer_blocks.{i}.norm1.emb.{name}"] for i in range(depth)]
        differing += [
            f"transformer_blocks.{i}.norm1.emb.{name}"
            for i in range(1, depth)
            if not np.array_equal(copies[i], copies[0])
        ]
        official[key] = copies[0]
    if differing:
        raise ValueError(
            f"{source}: the timestep/label embedders differ between blocks, so they cannot be "
            f"collapsed into DiT's single copy; differing from block 0: {', '.join(differing)}"
        )
    for key, value in state_dict.items():
        if ".norm1.emb." in key or ".attn1.to_k." in key or ".attn1.to_v." in key:
            continue
        if ".attn1.to_q." in key:
            value = np.concatenate([state_dict[key.replace(".to_q.", f".to_{n}.")] for n in "qkv"])
            key = key.replace(".to_q.", ".qkv.")
        official[_rename(key, False)] = value
    return official


def _diffusers_folder(path: str | os.PathLike) -> epath.Path:
    folder = storage.path(path)
    if (
        not (folder / "config.json").is_file()
        and (folder / "transformer" / "config.json").is_file()
    ):
        folder = folder / "transformer"  # a pipeline folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no config.json (expected a diffusers DiTTransformer2DModel folder)"
        )
    return folder


def dit_from_diffusers(path: str | os.PathLike, **overrides: Any) -> tuple[DiT, dict]:
    """Loads a diffusers `DiTTransformer2DModel` folder -> (DiT module, params).

    The module gets diffusers' semantics (timestep_freq_shift=1, mlp_norm_eps from config.json);
    overrides: further DiT fields (dtype, remat, ...).
    """
    folder = _diffusers_folder(path)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    module = DiT(**{**dit_config_from_diffusers(config, str(config_path)), **overrides})
    _check_convertible(module)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            weights = folder / name
            break
    else:
        raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")
    source = str(weights)
    state_dict = load_state_dict(weights)
    check_state_dict(state_dict, _diffusers_shapes(module), source)
    official = _official_from_diffusers(state_dict, module.depth, source)
    return module, params_from_official(official, module, source)
