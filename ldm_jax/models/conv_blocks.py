"""The convolutional building blocks the KL-VAE and the U-Net share, in diffusers' layout (NHWC).

`conv` / `dense` / `group_norm` build layers with PyTorch's default initialisation and logical axis
names on every parameter; `ResnetBlock` is diffusers' `ResnetBlock2D` (with the U-Net's time
embedding optional), `Downsample` / `Upsample` its resamplers. Submodule names are diffusers'
state-dict names, which is all the weight converters rely on.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

CONV_KERNEL_AXES = ("conv_h", "conv_w", "channels_in", "channels_out")
DENSE_KERNEL_AXES = ("channels_in", "channels_out")
BIAS_AXES = ("channels_out",)
NORM_AXES = ("norm",)

# PyTorch's default Conv2d / Linear weight init (kaiming_uniform with a=sqrt(5)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def with_kernel(layer: type[nn.Module], kernel_axes: tuple[str, ...], **kwargs: Any) -> nn.Module:
    """`layer(**kwargs)` with PyTorch-default kernel init and logical names, zero bias."""
    return layer(
        kernel_init=nn.with_logical_partitioning(torch_default_init, kernel_axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, BIAS_AXES),
        **kwargs,
    )


def conv(
    features: int,
    kernel: int,
    name: str | None,
    dtype: Dtype,
    param_dtype: Dtype,
    stride: int = 1,
    padding: Any = "SAME",
) -> nn.Conv:
    return with_kernel(
        nn.Conv,
        CONV_KERNEL_AXES,
        features=features,
        kernel_size=(kernel, kernel),
        strides=stride,
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
    return with_kernel(
        nn.Dense,
        DENSE_KERNEL_AXES,
        features=features,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def group_norm(
    groups: int, name: str, dtype: Dtype, param_dtype: Dtype, eps: float = 1e-6
) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        use_fast_variance=False,  # two-pass variance, as torch.nn.GroupNorm
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, NORM_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, NORM_AXES),
        name=name,
    )


class ConvLayer(nn.Module):
    """Base of the convolutional layers: keyword-only compute `dtype` and storage `param_dtype`."""

    _: dataclasses.KW_ONLY
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def dtypes(self) -> dict[str, Dtype]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class ResnetBlock(ConvLayer):
    """diffusers `ResnetBlock2D` (time_embedding_norm="default").

    x: [B, H, W, Cin] -> [B, H, W, out_channels]. temb: [B, T] (the U-Net's time embedding) adds
    `time_emb_proj(SiLU(temb))` after conv1; None (the VAE) has no time embedding. `eps`: GroupNorm.
    """

    out_channels: int
    groups: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        kw = self.dtypes
        h = nn.silu(group_norm(self.groups, "norm1", eps=self.eps, **kw)(x))
        h = conv(self.out_channels, 3, "conv1", **kw)(h)
        if temb is not None:
            h = h + dense(self.out_channels, "time_emb_proj", **kw)(nn.silu(temb))[:, None, None]
        h = nn.silu(group_norm(self.groups, "norm2", eps=self.eps, **kw)(h))
        h = conv(self.out_channels, 3, "conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return x + h


class Downsample(ConvLayer):
    """Stride-2 3x3 conv. [B, H, W, C] -> [B, H/2, W/2, C]. padding=0 (the VAE): pad right/bottom
    by one, no conv padding; padding=1 (the U-Net's `downsample_padding`): one on every side."""

    padding: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        pad = ((self.padding, self.padding),) * 2
        return conv(x.shape[-1], 3, "conv", stride=2, padding=pad, **self.dtypes)(x)


class Upsample(ConvLayer):
    """Nearest-neighbour x2, then a 3x3 conv. [B, H, W, C] -> [B, 2H, 2W, C]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], 3, "conv", **self.dtypes)(x)
