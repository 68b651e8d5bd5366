"""Transformer building blocks shared by denoisers: embeddings, attention, MLP, adaLN modulation.

All arrays are token-major: `x: [B, N, D]` (batch, tokens, width). Parameters are float32 and carry
logical axis names (`ldm_jax/parallel/partitioning.py`); `dtype` is the compute dtype. Initialisers
follow the DiT reference (xavier-uniform linears with zero bias, normal(0.02) embeddings, zeroed
adaLN modulation); models that load weights do not care.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")
HEAD_ACTIVATION_AXES = (
    "activation_batch",
    "activation_length",
    "activation_heads",
    "activation_kv",
)
MLP_ACTIVATIONS = {"gelu_tanh": partial(nn.gelu, approximate=True), "silu": nn.silu}

zeros = nn.initializers.zeros


def partitioned(init: nn.initializers.Initializer, names: Sequence[str]) -> Any:
    """`init` boxed with logical axis names (one per parameter dimension)."""
    return nn.with_logical_partitioning(init, tuple(names))


class Linear(nn.Module):
    """y = x . kernel + bias over x's last `in_dims` axes; kernel [*in, *features], float32.

    `kernel_axes` names every kernel dimension; the bias [*features] takes the output names.
    The default init is xavier-uniform with the fans of the flattened [prod(in), prod(features)]
    matrix, i.e. of the PyTorch `nn.Linear` the layer corresponds to. `use_bias=False`: no bias.
    """

    features: int | tuple[int, ...]
    kernel_axes: tuple[str, ...]
    in_dims: int = 1
    dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer | None = None
    bias_init: nn.initializers.Initializer = zeros
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        shape = x.shape[x.ndim - self.in_dims :] + features
        kernel_init = self.kernel_init or nn.initializers.xavier_uniform(
            in_axis=tuple(range(self.in_dims)), out_axis=tuple(range(self.in_dims, len(shape)))
        )
        kernel = self.param(
            "kernel", partitioned(kernel_init, self.kernel_axes), shape, jnp.float32
        )
        contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ()))
        )
        if not self.use_bias:
            return y
        bias = self.param(
            "bias",
            partitioned(self.bias_init, self.kernel_axes[self.in_dims :]),
            features,
            jnp.float32,
        )
        return y + bias.astype(self.dtype)


# ----------------------------------------------------------------------------- functions


def checked_conditions(model: str, spec: Mapping[str, tuple[str, tuple]], y: Any, batch: int) -> tuple[dict, dict]:
    """A backbone's conditions `y` (a dict, a bare label array, or None) checked against its
    `condition_fields()` `spec` (key -> (the field that enables it, dims); a str dim is a size bound
    by the first key that has it, "B" = `batch`). -> (the conditions as a dict, the bound sizes).
    ValueError naming the key and `<model>.<field>` for an unknown, missing or misshaped condition."""
    cond = {} if y is None else dict(y) if isinstance(y, Mapping) else {"label": y}
    unknown = sorted(set(cond) - set(spec))
    missing = sorted(set(spec) - set(cond) - {"context_mask"})
    if unknown or missing:
        takes = "; ".join(f"{key!r} [{', '.join(map(str, dims))}] ({model}.{field})" for key, (field, dims) in spec.items())
        raise ValueError(
            f"{model} y has keys {sorted(cond)}: "
            + (f"unknown here: {unknown}; " if unknown else "")
            + (f"missing: {missing}; " if missing else "")
            + f"this config takes {takes or 'no condition (y=None)'}"
        )
    sizes = {"B": batch}
    for key, (field, dims) in spec.items():
        if key not in cond:
            continue
        shape, bound = tuple(jnp.shape(cond[key])), dict(sizes)
        if len(shape) != len(dims) or any(
            bound.setdefault(d, n) != n if isinstance(d, str) else d != n for d, n in zip(dims, shape)
        ):
            want = ", ".join(f"{d}={sizes[d]}" if d in sizes else str(d) for d in dims)
            raise ValueError(f"{model} y[{key!r}] has shape {shape}, but {model}.{field} needs [{want}]")
        sizes = bound
    return cond, sizes


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without scale/bias; statistics in float32 (two-pass variance).

    x: [..., D] -> [..., D] in x's dtype.
    """
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x * (1 + scale) + shift, per sample. x: [B, N, D]; shift, scale: [B, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def timestep_embedding(
    t: jax.Array,
    dim: int,
    max_period: float = 10000.0,
    freq_shift: float = 0.0,
    flip_sin_to_cos: bool = True,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first.

    t: [B] -> [B, dim] float32: [cos(t * f_i), sin(t * f_i)] with
    f_i = max_period ** (-i / (dim // 2 - freq_shift)), i < dim // 2; a zero column pads odd `dim`.
    `freq_shift=0` is DiT/GLIDE; diffusers' `Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=1)` is `freq_shift=1`. `flip_sin_to_cos=False`: sines first.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    halves = [jnp.cos(args), jnp.sin(args)]
    embedding = jnp.concatenate(halves if flip_sin_to_cos else halves[::-1], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


def sincos_pos_embed_2d(
    embed_dim: int, grid_h: int, grid_w: int, interpolation_scale: float = 1.0
) -> np.ndarray:
    """Fixed 2D sin-cos position embedding (MAE/DiT): a float32 constant [grid_h * grid_w, D].

    Tokens are row-major (row r, column c -> r * grid_w + c). Channels: the first half encodes the
    column (w) coordinate, the second half the row (h) coordinate; each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000 ** (-k / (embed_dim / 4)) and
    pos = index / interpolation_scale (diffusers' `interpolation_scale`; PixArt at 1024px uses 2).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by 4 for a 2D sin-cos embedding")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos / interpolation_scale, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    pos = np.concatenate([encode(cols.reshape(-1)), encode(rows.reshape(-1))], axis=1)
    return pos.astype(np.float32)


# ----------------------------------------------------------------------------- modules


class TimestepEmbedder(nn.Module):
    """t: [B] -> [B, hidden_size]: sinusoidal features -> Linear -> SiLU -> Linear."""

    hidden_size: int
    frequency_embedding_size: int = 256
    freq_shift: float = 0.0
    flip_sin_to_cos: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        h = timestep_embedding(
            t,
            self.frequency_embedding_size,
            freq_shift=self.freq_shift,
            flip_sin_to_cos=self.flip_sin_to_cos,
        )
        h = Linear(
            self.hidden_size, ("freq", "mlp"), dtype=self.dtype, kernel_init=init, name="fc1"
        )(h)
        h = nn.silu(h)
        return Linear(
            self.hidden_size, ("mlp", "embed"), dtype=self.dtype, kernel_init=init, name="fc2"
        )(h)


class LabelEmbedder(nn.Module):
    """y: [B] int -> [B, hidden_size]; rows 0..num_classes-1, plus the null class row num_classes.

    The null row (classifier-free guidance) exists when `use_null_class`; label dropout is done
    outside the model (`ldm_jax.conditioning.pairs.drop_conditions`).
    """

    num_classes: int
    hidden_size: int
    use_null_class: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        table = self.param(
            "embedding_table",
            partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.num_classes + int(self.use_null_class), self.hidden_size),
            jnp.float32,
        )
        return jnp.take(table, y, axis=0).astype(self.dtype)


class Modulation(nn.Module):
    """adaLN modulation -> `num_chunks` arrays [B, D], in output order.

    adaln="zero" (DiT): c: [B, D] (already SiLU-activated) -> one Linear D -> num_chunks * D,
      zero-initialised (adaLN-Zero).
    adaln="single" (PixArt-alpha adaLN-single): c: [B, num_chunks * D], computed once for all blocks
      by the model; this module only adds its learned `scale_shift_table` [num_chunks * D] (the
      reference's [num_chunks, D] table, flattened), initialised N(0, 1/D).
    """

    num_chunks: int
    adaln: str = "zero"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
        if self.adaln == "single":
            width = c.shape[-1]
            table = self.param(
                "scale_shift_table",
                partitioned(
                    nn.initializers.normal((width // self.num_chunks) ** -0.5), ("modulation",)
                ),
                (width,),
                jnp.float32,
            )
            out = c.astype(self.dtype) + table.astype(self.dtype)
        else:
            out = Linear(
                self.num_chunks * c.shape[-1],
                ("embed", "modulation"),
                dtype=self.dtype,
                kernel_init=zeros,
                name="linear",
            )(c)
        return tuple(jnp.split(out, self.num_chunks, axis=-1))


class Attention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention to a token sequence.

    Self-attention: x: [B, N, D] -> [B, N, D] with one fused projection, qkv kernel [D, 3, H, Dh]
    (q, k, v stacked on axis 1).
    Cross-attention (`context` given): queries from x, keys/values from context: [B, L, Dc];
    q kernel [D, H, Dh], fused kv kernel [Dc, 2, H, Dh]. `context_mask`: [B, L] bool, True = a
    real token; padded tokens get no attention weight, and a sample whose tokens are all padding
    attends to nothing (its attention average is 0, so only the output bias remains).
    Output kernel [H, Dh, D] (`zero_init_output`: zero-initialised, as PixArt's cross-attention).
    `qk_norm` applies RMSNorm (learned scale [Dh]) to q and k per head. `qkv_bias=False`: the q, k,
    v projections have no bias (Stable Diffusion's U-Net).
    """

    num_heads: int
    qk_norm: bool = False
    zero_init_output: bool = False
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
    ) -> jax.Array:
        d = x.shape[-1]
        head_dim = d // self.num_heads
        heads = (self.num_heads, head_dim)
        if context is None:
            qkv = Linear(
                (3, *heads),
                ("embed", "qkv", "heads", "kv"),
                dtype=self.dtype,
                use_bias=self.qkv_bias,
                name="qkv",
            )(x)
            q, k, v = (qkv[:, :, i] for i in range(3))
        else:
            q = Linear(
                heads, ("embed", "heads", "kv"), dtype=self.dtype, use_bias=self.qkv_bias, name="q"
            )(x)
            kv = Linear(
                (2, *heads),
                ("embed", "qkv", "heads", "kv"),
                dtype=self.dtype,
                use_bias=self.qkv_bias,
                name="kv",
            )(context)
            k, v = kv[:, :, 0], kv[:, :, 1]
        q, k, v = (nn.with_logical_constraint(a, HEAD_ACTIVATION_AXES) for a in (q, k, v))
        if self.qk_norm:
            q, k = (
                nn.RMSNorm(
                    epsilon=1e-6,
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    scale_init=partitioned(nn.initializers.ones, ("norm",)),
                    name=name,
                )(a)
                for a, name in ((q, "q_norm"), (k, "k_norm"))
            )
        if context_mask is None:
            out = jax.nn.dot_product_attention(q, k, v)
        else:
            mask = context_mask.astype(bool)
            out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
            out = out * jnp.any(mask, axis=-1)[:, None, None, None].astype(out.dtype)
        proj = Linear(
            d,
            ("heads", "kv", "embed"),
            in_dims=2,
            dtype=self.dtype,
            kernel_init=zeros if self.zero_init_output else None,
            name="proj",
        )
        return proj(out)


class Mlp(nn.Module):
    """x: [B, ..., D] -> Linear(D -> hidden) -> activation -> Linear(hidden -> out_features or D).

    activation: "gelu_tanh" (transformer MLPs, PixArt's caption projection) or "silu" (SD3's
    pooled-text projection).
    """

    hidden_features: int
    out_features: int | None = None
    activation: str = "gelu_tanh"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"Mlp.activation={self.activation!r} is not one of {tuple(MLP_ACTIVATIONS)}"
            )
        out_features = self.out_features or x.shape[-1]
        h = Linear(self.hidden_features, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        # [B, N, hidden] token MLPs, or [B, hidden] for a vector (the pooled-text projection)
        axes = ("activation_batch",) + ("activation_length",) * (h.ndim - 2) + ("activation_mlp",)
        h = nn.with_logical_constraint(MLP_ACTIVATIONS[self.activation](h), axes)
        return Linear(out_features, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)
