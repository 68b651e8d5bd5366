"""pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`) -> `InceptionV3` params.

The file (supplied by the user; nothing is downloaded) is the state dict of pytorch-fid's
`fid_inception_v3()`: for every `BasicConv2d` at `P` (e.g. `Mixed_6d.branch1x1`)
`P.conv.weight` [O, I, kh, kw] and `P.bn.{weight, bias, running_mean, running_var}` [O]
(`P.bn.num_batches_tracked`, written by newer torch versions, is accepted and unused), and
`fc.weight` [1008, 2048], `fc.bias` [1008]. It is read by `torch_io.load_state_dict` (torch zip
checkpoints without torch, or safetensors).

Each BatchNorm (inference mode, eps 1e-3) is folded into its conv in float64:
    s = gamma / sqrt(running_var + eps),  kernel = W * s,  bias = beta - running_mean * s.
`fc.bias` is checked but not kept: the Inception Score uses the unbiased logits (see
`ldm_jax.models.inception`). Expected keys and shapes come from the Flax module itself
(`jax.eval_shape`), so the converter cannot drift from the architecture.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.torch_io import check_state_dict, load_state_dict
from ldm_jax.models.inception import NUM_CLASSES, InceptionV3

BN_EPS = 1e-3
BN_STATS = ("weight", "bias", "running_mean", "running_var")
_OPTIONAL_SUFFIX = ".bn.num_batches_tracked"


def param_shapes(module: InceptionV3) -> dict[str, Any]:
    """The module's unboxed param tree as `jax.ShapeDtypeStruct`s (no compile, no random init)."""
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3), jnp.float32))
    return nn.unbox(boxed["params"])


def _conv_prefixes(shapes: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """{'Mixed_5b.branch1x1': ('Mixed_5b', 'branch1x1'), ...} for every conv (a node with a bias)."""
    found = {}
    for name, node in shapes.items():
        path = prefix + (name,)
        if "bias" in node:
            found[".".join(path)] = path
        elif "kernel" not in node:
            found.update(_conv_prefixes(node, path))
    return found


def expected_state_dict_shapes(module: InceptionV3) -> dict[str, tuple[int, ...]]:
    """torch key -> shape that pytorch-fid's state dict has for `module`'s widths."""
    shapes = param_shapes(module)
    expected: dict[str, tuple[int, ...]] = {}
    for key, path in _conv_prefixes(shapes).items():
        node = shapes
        for name in path:
            node = node[name]
        kh, kw, c_in, c_out = node["kernel"].shape
        expected[f"{key}.conv.weight"] = (c_out, c_in, kh, kw)
        for stat in BN_STATS:
            expected[f"{key}.bn.{stat}"] = (c_out,)
    width, classes = shapes["fc"]["kernel"].shape
    expected["fc.weight"] = (classes, width)
    expected["fc.bias"] = (classes,)
    return expected


def _folded_conv(state_dict: Mapping[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    """`key.conv` + `key.bn` -> {'kernel': HWIO, 'bias': [O]} (float32, folded in float64)."""
    weight = np.asarray(state_dict[f"{key}.conv.weight"], np.float64)
    gamma, beta, mean, var = (np.asarray(state_dict[f"{key}.bn.{s}"], np.float64) for s in BN_STATS)
    scale = gamma / np.sqrt(var + BN_EPS)
    kernel = np.transpose(weight * scale[:, None, None, None], (2, 3, 1, 0))
    return {"kernel": kernel.astype(np.float32), "bias": (beta - mean * scale).astype(np.float32)}


def inception_params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], module: InceptionV3, source: str = "FID Inception weights"
) -> dict[str, Any]:
    """Unboxed `module` params from pytorch-fid's state dict (BatchNorms folded into the convs).

    Raises one `CheckpointMismatchError` listing every missing, unexpected or misshaped key.
    """
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(_OPTIONAL_SUFFIX)}
    check_state_dict(state_dict, expected_state_dict_shapes(module), source)
    params: dict[str, Any] = {}
    for key, path in _conv_prefixes(param_shapes(module)).items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = _folded_conv(state_dict, key)
    params["fc"] = {"kernel": np.asarray(state_dict["fc.weight"], np.float32).T.copy()}
    return params


def inception_from_pytorch_fid(
    path: str | os.PathLike,
    *,
    width_divisor: int = 1,
    num_classes: int = NUM_CLASSES,
    dtype: Any = jnp.float32,
) -> tuple[InceptionV3, dict[str, Any]]:
    """(InceptionV3, unboxed params) from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.

    `width_divisor` / `num_classes` are the real network's (1, 1008) unless a reduced test network
    is loaded; `dtype` is the compute dtype.
    """
    module = InceptionV3(width_divisor=width_divisor, num_classes=num_classes, dtype=dtype)
    source = f"FID Inception weights {os.fspath(path)}"
    return module, inception_params_from_state_dict(load_state_dict(path), module, source)
