"""Stable Diffusion's transformer on a feature map: diffusers' `Transformer2DModel` with
`BasicTransformerBlock`s (self-attention, cross-attention to a text context, GEGLU feed-forward),
the attention blocks of the U-Net (`ldm_jax.models.unet`). NHWC in, NHWC out.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.conv_blocks import conv, dense, group_norm
from ldm_jax.models.layers import ACTIVATION_AXES, Attention, Linear, partitioned

Dtype = Any


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    """torch.nn.LayerNorm(eps=1e-5) with scale and bias."""
    return nn.LayerNorm(
        epsilon=1e-5,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=partitioned(nn.initializers.ones, ("norm",)),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def remat_class(cls: type[nn.Module], remat: bool, policy: str) -> type[nn.Module]:
    """`cls`, rematerialised with `jax.checkpoint_policies.<policy>` when `remat`."""
    return nn.remat(cls, policy=getattr(jax.checkpoint_policies, policy)) if remat else cls


class GEGLU(nn.Module):
    """x: [B, N, D] -> proj -> (hidden, gate) -> hidden * gelu(gate) (exact GELU): [B, N, inner]."""

    inner: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Linear(2 * self.inner, ("embed", "mlp"), dtype=self.dtype, name="proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        h = hidden * nn.gelu(gate, approximate=False)
        return nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp")
        )


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="geglu")`: GEGLU to 4D, then a linear back to D."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = GEGLU(4 * d, dtype=self.dtype, name="net_0")(x)
        return Linear(d, ("mlp", "embed"), dtype=self.dtype, name="net_2")(h)


class TransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock` (norm_type="layer_norm"). x: [B, N, D] -> [B, N, D];
    context: [B, L, Dc]; context_mask: [B, L] bool or None."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, context_mask: jax.Array | None = None
    ) -> jax.Array:
        kw = dict(qkv_bias=False, dtype=self.dtype)
        x = x + Attention(self.num_heads, name="attn1", **kw)(_layer_norm("norm1", self.dtype)(x))
        x = x + Attention(self.num_heads, name="attn2", **kw)(
            _layer_norm("norm2", self.dtype)(x), context, context_mask
        )
        x = x + FeedForward(dtype=self.dtype, name="ff")(_layer_norm("norm3", self.dtype)(x))
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class Transformer2D(nn.Module):
    """diffusers `Transformer2DModel` on a feature map. x: [B, H, W, C] -> [B, H, W, C].

    Width inside: num_heads * (C // num_heads).
    """

    num_heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, context_mask: jax.Array | None = None
    ) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        b, h, w, c = x.shape
        inner = self.num_heads * (c // self.num_heads)
        y = group_norm(self.groups, "norm", **kw)(x)  # eps 1e-6
        if self.use_linear_projection:
            y = dense(inner, "proj_in", **kw)(y.reshape(b, h * w, c))
        else:
            y = conv(inner, 1, "proj_in", **kw)(y).reshape(b, h * w, inner)
        y = nn.with_logical_constraint(y, ACTIVATION_AXES)
        block = remat_class(TransformerBlock, self.remat, self.remat_policy)
        for k in range(self.num_layers):
            y = block(self.num_heads, dtype=self.dtype, name=f"transformer_blocks_{k}")(
                y, context, context_mask
            )
        if self.use_linear_projection:
            y = dense(c, "proj_out", **kw)(y).reshape(b, h, w, c)
        else:
            y = conv(c, 1, "proj_out", **kw)(y.reshape(b, h, w, inner))
        return y + x
