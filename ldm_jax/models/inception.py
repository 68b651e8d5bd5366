"""The FID InceptionV3 (pytorch-fid's `fid_inception_v3`, TF's inception-2015-12-05 graph), NHWC.

One forward pass gives the three feature sets the ADM evaluation suite uses:
  pool             [B, 2048]     `pool_3`: the final global average pool (FID, precision/recall);
  spatial          [B, 2023]     `mixed_6/conv`: the ReLU output of `Mixed_6d.branch1x1`
                                 ([B, 17, 17, 192] at 299), first 7 channels, flattened in H, W, C
                                 order (sFID; exactly ADM's `spatial[..., :7]`);
  logits_unbiased  [B, 1008]     pool @ fc.weight^T WITHOUT the fc bias: the `softmax/logits/MatMul`
                                 tensor that improved-GAN, ADM's evaluator and torch-fidelity feed
                                 to the softmax for the Inception Score (all 1008 classes).

Preprocessing follows pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`: images
in [0, 1] are resized to `image_size` (299) with `F.interpolate(mode='bilinear',
align_corners=False)` semantics -- half-pixel centres, two taps, NO antialiasing when shrinking
(`jax.image.resize` antialiases, so `resize_bilinear` is written out) -- then mapped to [-1, 1].

The blocks are torchvision's `Inception3` with pytorch-fid's patches: every 3x3 average pool in a
branch ignores the zero padding (`count_include_pad=False`: FIDInceptionA, FIDInceptionC,
FIDInceptionE_1 = `Mixed_7b`) and `Mixed_7c` (FIDInceptionE_2) max-pools its pool branch.
Submodules carry torchvision's names (`Conv2d_1a_3x3`, `Mixed_6d/branch1x1`, `fc`, ...). Each
`BasicConv2d` (conv without bias, BatchNorm eps 1e-3 with running statistics, ReLU) is one
`nn.Conv` with a bias here: `ldm_jax.convert.inception` folds the BatchNorm into the conv.

`width_divisor` divides every conv width (1 = the real network; 2, 4, 8, 16 give small test
networks) and `num_classes` sizes the fc (1008 in the real weights). Weights come from
`ldm_jax.convert.inception.inception_from_pytorch_fid`; the random init only fixes shapes.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.conv_blocks import BIAS_AXES, CONV_KERNEL_AXES

Dtype = Any

IMAGE_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM's sFID keeps the first 7 channels of mixed_6/conv
WIDTH_DIVISORS = (1, 2, 4, 8, 16)  # every conv width of InceptionV3 is a multiple of 16
MIN_IMAGE_SIZE = 75  # the smallest input the stride-2 stages accept

FC_KERNEL_AXES = ("embed", "vocab")

_kernel_init = nn.with_logical_partitioning(
    nn.initializers.variance_scaling(2.0, "fan_in", "normal"), CONV_KERNEL_AXES
)
_bias_init = nn.with_logical_partitioning(nn.initializers.zeros, BIAS_AXES)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of torch's bilinear `align_corners=False` resize along one axis.

    Output pixel i samples src = (i + 0.5) * in/out - 0.5, clamped at 0; it mixes rows
    floor(src) and floor(src) + 1 (clamped to the last row) with weights 1 - frac, frac.
    Computed like ATen's CPU kernel -- a float32 scale, then `scale * (i + 0.5) - 0.5` rounded once
    to float32 (a fused multiply-add; the float64 product is exact) -- so the weights agree with
    torch's to the bit.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(f32)
    src = np.maximum(src, f32(0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(f32), f32(0), f32(1))
    return lo, hi, frac


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(x, size, mode='bilinear', align_corners=False)` for NHWC `[B, H, W, C]`.

    No antialiasing: shrinking reads only the two nearest source pixels per axis, as torch does.
    Returns `[B, size[0], size[1], C]` in the input's dtype.
    """
    out = images
    for axis, out_size in ((2, size[1]), (1, size[0])):  # W then H: ATen's order of the sums
        in_size = out.shape[axis]
        if in_size == out_size:
            continue  # torch's scale is then exactly 1: the identity
        lo, hi, frac = _linear_taps(in_size, out_size)
        shape = [1] * out.ndim
        shape[axis] = out_size
        w1 = jnp.asarray(frac, out.dtype).reshape(shape)
        w0 = jnp.asarray(np.float32(1) - frac, out.dtype).reshape(shape)
        out = jnp.take(out, lo, axis=axis) * w0 + jnp.take(out, hi, axis=axis) * w1
    return out


class _Stage(nn.Module):
    """Shared fields of the network and its blocks, and the `BasicConv2d` they are built from."""

    width_divisor: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def conv(self, x: jax.Array, name: str, features: int, kernel: Any, stride: int = 1, padding: Any = 0) -> jax.Array:
        """torchvision's `BasicConv2d(kernel_size=kernel, stride, padding)` with its BatchNorm folded
        in (a conv bias), then ReLU. `features` is the real network's width."""
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        conv = nn.Conv(
            features // self.width_divisor,
            (kh, kw),
            strides=stride,
            padding=((ph, ph), (pw, pw)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=_kernel_init,
            bias_init=_bias_init,
            name=name,
        )
        return nn.relu(conv(x))

    def block_fields(self) -> dict[str, Any]:
        return dict(width_divisor=self.width_divisor, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """TF's branch average pool: 3x3, stride 1, padding 1, padded zeros not counted."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(_Stage):
    """FIDInceptionA: [B, H, W, C] -> [B, H, W, (224 + pool_features) / width_divisor]."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv(x, "branch1x1", 64, 1)
        b5 = self.conv(self.conv(x, "branch5x5_1", 48, 1), "branch5x5_2", 64, 5, padding=2)
        b3 = self.conv(x, "branch3x3dbl_1", 64, 1)
        b3 = self.conv(b3, "branch3x3dbl_2", 96, 3, padding=1)
        b3 = self.conv(b3, "branch3x3dbl_3", 96, 3, padding=1)
        bp = self.conv(_avg_pool_3x3(x), "branch_pool", self.pool_features, 1)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Stage):
    """InceptionB (Mixed_6a, a stride-2 reduction): [B, H, W, C] -> [B, H', W', C + 480 / d]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv(x, "branch3x3", 384, 3, stride=2)
        bd = self.conv(x, "branch3x3dbl_1", 64, 1)
        bd = self.conv(bd, "branch3x3dbl_2", 96, 3, padding=1)
        bd = self.conv(bd, "branch3x3dbl_3", 96, 3, stride=2)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(_Stage):
    """FIDInceptionC: [B, H, W, C] -> ([B, H, W, 768 / d], its branch1x1 [B, H, W, 192 / d])."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c7 = self.channels_7x7
        b1 = self.conv(x, "branch1x1", 192, 1)
        b7 = self.conv(x, "branch7x7_1", c7, 1)
        b7 = self.conv(b7, "branch7x7_2", c7, (1, 7), padding=(0, 3))
        b7 = self.conv(b7, "branch7x7_3", 192, (7, 1), padding=(3, 0))
        bd = self.conv(x, "branch7x7dbl_1", c7, 1)
        bd = self.conv(bd, "branch7x7dbl_2", c7, (7, 1), padding=(3, 0))
        bd = self.conv(bd, "branch7x7dbl_3", c7, (1, 7), padding=(0, 3))
        bd = self.conv(bd, "branch7x7dbl_4", c7, (7, 1), padding=(3, 0))
        bd = self.conv(bd, "branch7x7dbl_5", 192, (1, 7), padding=(0, 3))
        bp = self.conv(_avg_pool_3x3(x), "branch_pool", 192, 1)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(_Stage):
    """InceptionD (Mixed_7a, a stride-2 reduction): [B, H, W, C] -> [B, H', W', C + 512 / d]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv(self.conv(x, "branch3x3_1", 192, 1), "branch3x3_2", 320, 3, stride=2)
        b7 = self.conv(x, "branch7x7x3_1", 192, 1)
        b7 = self.conv(b7, "branch7x7x3_2", 192, (1, 7), padding=(0, 3))
        b7 = self.conv(b7, "branch7x7x3_3", 192, (7, 1), padding=(3, 0))
        b7 = self.conv(b7, "branch7x7x3_4", 192, 3, stride=2)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(_Stage):
    """FIDInceptionE_1 (`pool='avg'`, Mixed_7b) / FIDInceptionE_2 (`pool='max'`, Mixed_7c):
    [B, H, W, C] -> [B, H, W, 2048 / d]."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv(x, "branch1x1", 320, 1)
        b3 = self.conv(x, "branch3x3_1", 384, 1)
        b3 = jnp.concatenate(
            [
                self.conv(b3, "branch3x3_2a", 384, (1, 3), padding=(0, 1)),
                self.conv(b3, "branch3x3_2b", 384, (3, 1), padding=(1, 0)),
            ],
            axis=-1,
        )
        bd = self.conv(x, "branch3x3dbl_1", 448, 1)
        bd = self.conv(bd, "branch3x3dbl_2", 384, 3, padding=1)
        bd = jnp.concatenate(
            [
                self.conv(bd, "branch3x3dbl_3a", 384, (1, 3), padding=(0, 1)),
                self.conv(bd, "branch3x3dbl_3b", 384, (3, 1), padding=(1, 0)),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:  # the FID graph's quirk in its last block: a max pool (padding never wins a max)
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = self.conv(pooled, "branch_pool", 192, 1)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(_Stage):
    """The FID Inception. `__call__(images)`: images [B, H, W, 3] in [0, 1] (any H, W) ->
    {"pool": [B, 2048 / d], "spatial": [B, s * s * 7], "logits_unbiased": [B, num_classes]}, float32;
    s = 17 at `image_size` 299.

    `dtype` is the compute dtype (float32 for evaluation: FID is sensitive to feature precision);
    `precision` the matmul/conv precision (HIGHEST keeps TPU/GPU convs in full float32).
    """

    num_classes: int = NUM_CLASSES
    image_size: int = IMAGE_SIZE

    def __post_init__(self):
        if self.width_divisor not in WIDTH_DIVISORS:
            raise ValueError(f"InceptionV3.width_divisor={self.width_divisor!r}; use one of {WIDTH_DIVISORS}")
        if not isinstance(self.image_size, int) or self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"InceptionV3.image_size={self.image_size!r} must be an int >= {MIN_IMAGE_SIZE}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"InceptionV3.num_classes={self.num_classes!r} must be a positive int")
        super().__post_init__()

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects images [B, H, W, 3] in [0, 1], got shape {tuple(images.shape)}")
        x = resize_bilinear(images.astype(jnp.float32), (self.image_size, self.image_size))
        x = (2 * x - 1).astype(self.dtype)
        x = self.conv(x, "Conv2d_1a_3x3", 32, 3, stride=2)
        x = self.conv(x, "Conv2d_2a_3x3", 32, 3)
        x = self.conv(x, "Conv2d_2b_3x3", 64, 3, padding=1)
        x = _max_pool_3x3_stride2(x)
        x = self.conv(x, "Conv2d_3b_1x1", 80, 1)
        x = self.conv(x, "Conv2d_4a_3x3", 192, 3)
        x = _max_pool_3x3_stride2(x)
        fields = self.block_fields()
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features=pool_features, name=name, **fields)(x)
        x = InceptionB(name="Mixed_6a", **fields)(x)
        for name, channels_7x7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x, branch1x1 = InceptionC(channels_7x7=channels_7x7, name=name, **fields)(x)
            if name == "Mixed_6d":  # TF's mixed_6/conv
                spatial = branch1x1[..., :SPATIAL_CHANNELS]
        x = InceptionD(name="Mixed_7a", **fields)(x)
        x = InceptionE(pool="avg", name="Mixed_7b", **fields)(x)
        x = InceptionE(pool="max", name="Mixed_7c", **fields)(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        fc = nn.Dense(
            self.num_classes,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), FC_KERNEL_AXES),
            name="fc",
        )
        return {
            "pool": pool,
            "spatial": spatial.astype(jnp.float32).reshape(spatial.shape[0], -1),
            "logits_unbiased": fc(pool),
        }
