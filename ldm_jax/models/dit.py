"""DiT: the class-conditional diffusion transformer with adaLN-Zero blocks (Peebles & Xie, 2023).

Mirrors the reference `models.py` (facebookresearch/DiT), NHWC:

    x [B, H, W, C] -> patchify + Linear -> + fixed 2D sin-cos position embedding  -> [B, N, D]
    c = TimestepEmbedder(t) + LabelEmbedder(y)                                     -> [B, D]
    depth x DiTBlock(x, c):  shift/scale/gate (msa), shift/scale/gate (mlp) = adaLN(SiLU(c))
        x += gate_msa * Attention(modulate(LN(x), shift_msa, scale_msa))
        x += gate_mlp * Mlp(modulate(LN(x), shift_mlp, scale_mlp))
    FinalLayer: shift, scale = adaLN(SiLU(c)); Linear(modulate(LN(x), shift, scale)) -> unpatchify
    -> [B, H, W, out_channels]   (learn_sigma: channels [:C] are eps, [C:] the variance values v)

Two config fields select diffusers' `DiTTransformer2DModel` semantics, which differ from the
original in exactly two places: `timestep_freq_shift=1` (frequency divisor half - 1 instead of
half) and `mlp_norm_eps=1e-5` (eps of the LayerNorm before the MLP). Everything else (sin/cos
order, modulation chunk order, final shift/scale order, null-class row) is the same.

Label dropout for classifier-free guidance is not done inside the model: the training step calls
`drop_labels`. Parameter layout (what the converters in `ldm_jax.convert.dit` produce):

    x_embedder/{kernel [p, p, C, D], bias [D]}
    t_embedder/fc1 {kernel [256, D]}, t_embedder/fc2 {kernel [D, D]}
    y_embedder/embedding_table [num_classes (+1), D]
    blocks_i/adaLN_modulation/linear {kernel [D, 6D]}
    blocks_i/attn/qkv {kernel [D, 3, H, Dh]}, blocks_i/attn/proj {kernel [H, Dh, D]}
    blocks_i/mlp/fc1 {kernel [D, 4D]}, blocks_i/mlp/fc2 {kernel [4D, D]}
    final_layer/adaLN_modulation/linear {kernel [D, 2D]}, final_layer/linear {kernel [D, p, p, C']}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import (
    ACTIVATION_AXES,
    Attention,
    LabelEmbedder,
    Mlp,
    Modulation,
    TimestepEmbedder,
    Linear,
    layer_norm,
    modulate,
    sincos_pos_embed_2d,
    zeros,
)

Dtype = Any

# name -> (hidden_size, depth, num_heads), from the DiT paper (Table 1).
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
DIT_PATCH_SIZES = (2, 4, 8)
DIT_PRESETS = tuple(f"DiT-{size}/{p}" for size in DIT_SIZES for p in DIT_PATCH_SIZES)

REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)


def drop_labels(key: jax.Array, y: jax.Array, prob: float, num_classes: int) -> jax.Array:
    """Replaces each label by the null class `num_classes` with probability `prob`. y: [B] int."""
    drop = jax.random.uniform(key, y.shape) < prob
    return jnp.where(drop, num_classes, y)


def _patch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Conv2d bias init, U(+-1/sqrt(fan_in)), which the reference keeps."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class DiTBlock(nn.Module):
    """x: [B, N, D], c: [B, D] (SiLU already applied) -> [B, N, D]."""

    num_heads: int
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    mlp_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = Modulation(
            6, dtype=self.dtype, name="adaLN_modulation"
        )(c)
        attn = Attention(self.num_heads, qk_norm=self.qk_norm, dtype=self.dtype, name="attn")
        x = x + gate_msa[:, None] * attn(modulate(layer_norm(x, 1e-6), shift_msa, scale_msa))
        mlp = Mlp(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype, name="mlp")
        x = x + gate_mlp[:, None] * mlp(
            modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp)
        )
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class FinalLayer(nn.Module):
    """x: [B, N, D], c: [B, D] (SiLU applied) -> [B, N, p, p, out_channels]; zero-initialised."""

    patch_size: int
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = Modulation(2, dtype=self.dtype, name="adaLN_modulation")(c)
        p = self.patch_size
        linear = Linear(
            (p, p, self.out_channels),
            ("embed", "conv_h", "conv_w", "channels_out"),
            dtype=self.dtype,
            kernel_init=zeros,
            name="linear",
        )
        return linear(modulate(layer_norm(x, 1e-6), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer. __call__(x [B, H, W, C], t [B] float, y [B] int) -> [B, H, W, C'].

    C' = 2C with `learn_sigma` (eps, then variance interpolation values), else C. `y` may be the
    null class `num_classes` when `class_dropout_prob > 0`. The output is float32 whatever the
    compute `dtype`.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    # diffusers semantics: timestep_freq_shift=1, mlp_norm_eps=1e-5.
    timestep_freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    qk_norm: bool = False
    dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"

    def __post_init__(self):
        positive = (
            "input_size",
            "patch_size",
            "in_channels",
            "hidden_size",
            "depth",
            "num_heads",
            "num_classes",
        )
        for field in positive:
            if getattr(self, field) <= 0:
                raise ValueError(f"DiT.{field}={getattr(self, field)} must be positive")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"DiT.input_size={self.input_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiT.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"DiT.hidden_size={self.hidden_size} must be divisible by 4 (2D sin-cos embedding)"
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"DiT.class_dropout_prob={self.class_dropout_prob} must be in [0, 1)")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"DiT.remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}"
            )
        super().__post_init__()

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"DiT input x must be [B, H, W, C], got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"DiT input has {x.shape[-1]} channels, but DiT.in_channels={self.in_channels}"
            )
        if x.shape[1:3] != (self.input_size, self.input_size):
            raise ValueError(
                f"DiT input is {x.shape[1]}x{x.shape[2]}, but DiT.input_size={self.input_size}"
            )
        if t.shape != x.shape[:1] or y.shape != x.shape[:1]:
            raise ValueError(f"DiT t and y must be [B]={x.shape[:1]}, got t {t.shape}, y {y.shape}")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        self._check_inputs(x, t, y)
        b, p, d = x.shape[0], self.patch_size, self.hidden_size
        g = self.input_size // p  # tokens per side

        # Patchify: [B, H, W, C] -> [B, g, g, p, p, C] -> Linear -> [B, N, D].
        patches = x.reshape(b, g, p, g, p, self.in_channels).transpose(0, 1, 3, 2, 4, 5)
        x_embedder = Linear(
            d,
            ("conv_h", "conv_w", "channels_in", "embed"),
            in_dims=3,
            dtype=self.dtype,
            bias_init=_patch_bias_init(p * p * self.in_channels),
            name="x_embedder",
        )
        h = x_embedder(patches).reshape(b, g * g, d)
        h = h + sincos_pos_embed_2d(d, g, g).astype(h.dtype)
        h = nn.with_logical_constraint(h, ACTIVATION_AXES)

        c = TimestepEmbedder(
            d, freq_shift=self.timestep_freq_shift, dtype=self.dtype, name="t_embedder"
        )(t)
        c = c + LabelEmbedder(
            self.num_classes, d, self.class_dropout_prob > 0, dtype=self.dtype, name="y_embedder"
        )(y)
        c = nn.silu(c)  # every adaLN modulation starts with SiLU; apply it once

        block_cls = DiTBlock
        if self.remat:
            block_cls = nn.remat(
                DiTBlock, policy=getattr(jax.checkpoint_policies, self.remat_policy)
            )
        for i in range(self.depth):
            h = block_cls(
                self.num_heads,
                self.mlp_ratio,
                self.qk_norm,
                self.mlp_norm_eps,
                self.dtype,
                name=f"blocks_{i}",
            )(h, c)

        out = FinalLayer(p, self.out_channels, dtype=self.dtype, name="final_layer")(h, c)
        # Unpatchify: [B, g, g, p, p, C'] -> [B, g, p, g, p, C'] -> [B, H, W, C'].
        out = out.reshape(b, g, g, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, g * p, g * p, self.out_channels).astype(jnp.float32)


def dit_preset(name: str, **overrides: Any) -> DiT:
    """A DiT configured as a paper preset, e.g. `dit_preset("DiT-XL/2", input_size=32)`.

    `overrides` set any other DiT field (input_size, num_classes, dtype, remat, ...).
    """
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; allowed: {', '.join(DIT_PRESETS)}")
    size, patch = name[len("DiT-") :].split("/")
    hidden_size, depth, num_heads = DIT_SIZES[size]
    config = dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=int(patch))
    config.update(overrides)
    return DiT(**config)
