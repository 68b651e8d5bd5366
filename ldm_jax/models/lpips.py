"""LPIPS perceptual distance (Zhang et al. 2018; the `lpips` package with net='vgg', version 0.1), NHWC.

    d(x, y) = sum_l mean_hw( w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2 )

- inputs in [-1, 1] are shifted/scaled per channel by lpips' ScalingLayer (ImageNet statistics
  written for [-1, 1] inputs: shift (-.030, -.088, -.188), scale (.458, .448, .450));
- f_l are the VGG16 `features` activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3
  (3x3 convs with padding 1, 2x2 max-pool between blocks), unit-normalised over channels
  (x / (|x| + 1e-10));
- w_l are the `lin{l}` 1x1 convs (one output, no bias).

Submodules are named after the torch state dicts: `features_{i}` is torchvision's `features.{i}`
conv (i = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), `lin{l}` the lpips package's
`lin{l}.model.1`. `widths` (one per VGG block) is VGG16's by default; smaller widths give tiny
test networks. Weights come from `ldm_jax.convert.lpips`; the random init only fixes shapes
(PyTorch's default conv init).

The channel norm's gradient is taken as 0 where a feature vector is exactly zero (torch's
sqrt gives NaN there); values are identical.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.conv_blocks import BIAS_AXES, CONV_KERNEL_AXES, torch_default_init

Dtype = Any

VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_DEPTHS = (2, 2, 3, 3, 3)  # convs per block
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def vgg16_conv_indices() -> tuple[tuple[int, ...], ...]:
    """torchvision `vgg16().features` indices of the convs, per block: ((0, 2), (5, 7), ...)."""
    blocks, i = [], 0
    for block, depth in enumerate(VGG16_DEPTHS):
        if block:
            i += 1  # the max-pool before the block
        blocks.append(tuple(range(i, i + 2 * depth, 2)))  # conv, relu, conv, relu, ...
        i += 2 * depth
    return tuple(blocks)


def _unit_normalise(f: jax.Array) -> jax.Array:
    """f / (|f| + eps) over channels, in float32; the norm's gradient is 0 at |f| = 0."""
    f = f.astype(jnp.float32)
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + EPS)


class LPIPS(nn.Module):
    """LPIPS-VGG distance. `__call__(x, y)`: x, y [B, H, W, 3] in [-1, 1] -> [B] (float32).

    `features(x)` -> the five unit-normalised taps [B, H/2^l, W/2^l, widths[l]];
    `distance(fx, fy)` -> [B] from taps. Computing the taps of a fixed target once (without gradient)
    and differentiating only `distance(fx, features(y))` halves the backward pass of a loss.
    """

    widths: Sequence[int] = VGG16_WIDTHS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        widths = self.widths
        if (isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) != 5
                or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w > 0
                           for w in widths)):
            raise ValueError(f"LPIPS.widths={widths!r} must be 5 positive ints (one per VGG16 block)")
        super().__post_init__()

    def setup(self):
        self.convs = [
            [
                nn.Conv(
                    width,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(torch_default_init, CONV_KERNEL_AXES),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, BIAS_AXES),
                    name=f"features_{i}",
                )
                for i in block
            ]
            for width, block in zip(self.widths, vgg16_conv_indices())
        ]
        self.lins = [
            nn.Conv(
                1,
                (1, 1),
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(torch_default_init, CONV_KERNEL_AXES),
                name=f"lin{l}",
            )
            for l in range(len(self.widths))
        ]

    def features(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """x: [B, H, W, 3] in [-1, 1] -> unit-normalised relu{1..5}_{2,2,3,3,3} taps (float32)."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects images [B, H, W, 3] in [-1, 1], got shape {tuple(x.shape)}")
        h = (x.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        h = h.astype(self.dtype)
        taps = []
        for block, convs in enumerate(self.convs):
            if block:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for conv in convs:
                h = nn.relu(conv(h))
            taps.append(_unit_normalise(h))
        return tuple(taps)

    def distance(self, fx: Sequence[jax.Array], fy: Sequence[jax.Array]) -> jax.Array:
        """Taps of x and y (from `features`) -> LPIPS [B], float32."""
        total = 0.0
        for lin, a, b in zip(self.lins, fx, fy):
            diff = jnp.square(a - b).astype(self.dtype)
            total = total + jnp.mean(lin(diff).astype(jnp.float32), axis=(1, 2, 3))
        return total

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x, y: [B, H, W, 3] in [-1, 1] -> [B]. One VGG pass over the 2B images."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        taps = self.features(jnp.concatenate([x, y], axis=0))
        b = x.shape[0]
        return self.distance([t[:b] for t in taps], [t[b:] for t in taps])
