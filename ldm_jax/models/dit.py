"""DiT: the diffusion transformer with adaLN-Zero blocks (Peebles & Xie, 2023), plus the
conditioning of text-to-image and image-conditioned variants (PixArt-alpha, SD-inpaint,
SD x4-upscaler).

The class-conditional DiT mirrors the reference `models.py` (facebookresearch/DiT), NHWC:

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

Conditioning. `y` is the class labels [B] int (the class-conditional DiT), or a dict holding what
the config asks for; a dict is a pytree, so samplers pass it through and guidance interleaves it.

    key            shape                      enabled by / meaning
    "label"        [B] int                    num_classes > 0 (0: no class embedder)
    "context"      [B, L, context_dim]        context_dim: a token sequence (text-encoder states),
                                              projected to D (caption_projection, Linear-GELU-
                                              Linear) and read by a cross-attention in each block
    "context_mask" [B, L] bool (optional)     False = padding: gets no cross-attention weight; a
                                              row with no real token attends to nothing
    "pooled"       [B, pooled_dim]            pooled text vector; Linear-SiLU-Linear, added to c
    "concat"       [B, h, w, concat_channels] concatenated to x before patch embedding (inpainting:
                                              mask + masked-image latents; super-resolution: the
                                              low-res image). h, w divide input_size; smaller maps
                                              are bilinearly upsampled to it
    "noise_level"  [B]                        noise_level_conditioning: the noise-augmentation level
                                              of "concat" (SD x4-upscaler), embedded like t, added
                                              to c

With cross-attention the block is PixArt-alpha's: self-attention, then x += CrossAttention(x,
context) (no norm, no gate; its output projection starts at zero), then the MLP.
`adaln="single"` is PixArt-alpha's adaLN-single: ONE Linear(SiLU(c)) -> 6D shared by all blocks,
each block adding its learned scale_shift_table [6D]; the final layer adds its table [2D] to c
itself (no SiLU, no Linear). `adaln="zero"` is DiT's per-block adaLN-Zero.

Classifier-free guidance: `Guidance.null_cond` has y's structure: "label": num_classes (the null
class); "context" / "context_mask" / "pooled": the empty caption's embedding [L, Dc], mask [L] and
pooled vector [Dp] (the model has no null token: caption dropout in training substitutes the same
empty-caption embedding); "concat" / "noise_level": the conditional values themselves (they are
not dropped). Condition dropout is not done inside the model: the training step calls
`ldm_jax.conditioning.pairs.drop_conditions`.

Parameter layout (the converters in `ldm_jax.convert.dit` / `ldm_jax.convert.pixart` produce it):

    x_embedder/{kernel [p, p, C + concat_channels, D], bias [D]}
    t_embedder/fc1 {kernel [256, D]}, t_embedder/fc2 {kernel [D, D]}
    y_embedder/embedding_table [num_classes (+1), D]              (num_classes > 0)
    pooled_embedder/fc1 {kernel [Dp, D]}, /fc2 {kernel [D, D]}    (pooled_dim)
    noise_level_embedder/fc1, /fc2 like t_embedder                (noise_level_conditioning)
    caption_projection/fc1 {kernel [Dc, D]}, /fc2 {kernel [D, D]}  (context_dim)
    adaln_single {kernel [D, 6D]}                                  (adaln="single")
    blocks_i/adaLN_modulation/linear {kernel [D, 6D]}   (zero) or /scale_shift_table [6D] (single)
    blocks_i/attn/qkv {kernel [D, 3, H, Dh]}, blocks_i/attn/proj {kernel [H, Dh, D]}
    blocks_i/cross_attn/q {kernel [D, H, Dh]}, /kv {kernel [D, 2, H, Dh]}, /proj  (context_dim)
    blocks_i/mlp/fc1 {kernel [D, 4D]}, blocks_i/mlp/fc2 {kernel [4D, D]}
    final_layer/adaLN_modulation/linear {kernel [D, 2D]} (zero) or /scale_shift_table [2D] (single)
    final_layer/linear {kernel [D, p, p, C']}
The text-encoder width Dc / Dp takes the logical name "embed" (a transformer width).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import (
    ACTIVATION_AXES,
    Attention,
    checked_conditions,
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

ADALN_TYPES = ("zero", "single")
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)


def _patch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Conv2d bias init, U(+-1/sqrt(fan_in)), which the reference keeps."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class DiTBlock(nn.Module):
    """x: [B, N, D] -> [B, N, D].

    c: [B, D] with SiLU applied (adaln="zero"), or the shared modulation [B, 6D] (adaln="single").
    context: [B, L, D] (already projected to D) adds a cross-attention after the self-attention;
    context_mask: [B, L] bool, False = padding.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    mlp_norm_eps: float = 1e-6
    adaln: str = "zero"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        c: jax.Array,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
    ) -> jax.Array:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = Modulation(
            6, self.adaln, dtype=self.dtype, name="adaLN_modulation"
        )(c)
        attn = Attention(self.num_heads, qk_norm=self.qk_norm, dtype=self.dtype, name="attn")
        x = x + gate_msa[:, None] * attn(modulate(layer_norm(x, 1e-6), shift_msa, scale_msa))
        if context is not None:
            cross_attn = Attention(
                self.num_heads,
                qk_norm=self.qk_norm,
                zero_init_output=True,
                dtype=self.dtype,
                name="cross_attn",
            )
            x = x + cross_attn(x, context, context_mask)
        mlp = Mlp(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype, name="mlp")
        x = x + gate_mlp[:, None] * mlp(
            modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp)
        )
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class FinalLayer(nn.Module):
    """x: [B, N, D] -> [B, N, p, p, out_channels]; zero-initialised.

    c: [B, D] with SiLU applied (adaln="zero"), or [c, c]: [B, 2D] without it (adaln="single").
    """

    patch_size: int
    out_channels: int
    adaln: str = "zero"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = Modulation(2, self.adaln, dtype=self.dtype, name="adaLN_modulation")(c)
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
    """Diffusion transformer. __call__(x [B, H, W, C], t [B] float, y) -> [B, H, W, C'].

    y: labels [B] int, or a dict of conditions (module docstring), or None when the config needs
    no condition. C' = 2C with `learn_sigma` (eps, then variance interpolation values), else C.
    A label may be the null class `num_classes` when `class_dropout_prob > 0`. The output is
    float32 whatever the compute `dtype`.
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
    # Conditioning beyond class labels (module docstring); the defaults are the class DiT.
    context_dim: int | None = None
    pooled_dim: int | None = None
    concat_channels: int = 0
    noise_level_conditioning: bool = False
    adaln: str = "zero"
    # Position indices are divided by it (diffusers' interpolation_scale).
    pos_interpolation_scale: float = 1.0
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
            "pos_interpolation_scale",
        )
        for field in positive:
            if getattr(self, field) <= 0:
                raise ValueError(f"DiT.{field}={getattr(self, field)} must be positive")
        for field in ("num_classes", "concat_channels"):
            if getattr(self, field) < 0:
                raise ValueError(f"DiT.{field}={getattr(self, field)} must be >= 0")
        for field in ("context_dim", "pooled_dim"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ValueError(f"DiT.{field}={value} must be None or positive")
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
        if self.adaln not in ADALN_TYPES:
            raise ValueError(f"DiT.adaln={self.adaln!r} is not one of {ADALN_TYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"DiT.remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}"
            )
        super().__post_init__()

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """One sample's shape: (input_size, input_size, in_channels)."""
        return (self.input_size, self.input_size, self.in_channels)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def condition_fields(self) -> dict[str, tuple[str, tuple[int | str, ...]]]:
        """The keys `y` takes under this config -> (the field enabling it, the expected shape).

        Shapes name their free sizes: B the batch, L the tokens, h and w the concat map's size
        (dividing input_size). "context_mask" is optional.
        """
        spec: dict[str, tuple[str, tuple[int | str, ...]]] = {}
        if self.num_classes:
            spec["label"] = (f"num_classes={self.num_classes}", ("B",))
        if self.context_dim is not None:
            field = f"context_dim={self.context_dim}"
            spec["context"] = (field, ("B", "L", self.context_dim))
            spec["context_mask"] = (field, ("B", "L"))
        if self.pooled_dim is not None:
            spec["pooled"] = (f"pooled_dim={self.pooled_dim}", ("B", self.pooled_dim))
        if self.concat_channels:
            channels = self.concat_channels
            spec["concat"] = (f"concat_channels={channels}", ("B", "h", "w", channels))
        if self.noise_level_conditioning:
            spec["noise_level"] = ("noise_level_conditioning=True", ("B",))
        return spec

    def _conditions(self, x: jax.Array, t: jax.Array, y: Any) -> dict[str, jax.Array]:
        """Checks x, t and y against the config; returns y as a dict (labels -> {"label": y})."""
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
        if t.shape != x.shape[:1]:
            raise ValueError(f"DiT t must be [B]={x.shape[:1]}, got {t.shape}")
        cond, sizes = checked_conditions("DiT", self.condition_fields(), y, x.shape[0])
        if "concat" in cond and (self.input_size % sizes["h"] or self.input_size % sizes["w"]):
            raise ValueError(
                f"DiT y['concat'] is {sizes['h']}x{sizes['w']}: h and w must divide "
                f"DiT.input_size={self.input_size}"
            )
        return cond

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: Any = None) -> jax.Array:
        cond = self._conditions(x, t, y)
        b, p, d = x.shape[0], self.patch_size, self.hidden_size
        g = self.input_size // p  # tokens per side

        if self.concat_channels:
            extra = jnp.asarray(cond["concat"]).astype(x.dtype)
            if extra.shape[1:3] != x.shape[1:3]:
                extra = jax.image.resize(extra, x.shape[:3] + extra.shape[3:], "bilinear")
            x = jnp.concatenate([x, extra], axis=-1)
        channels = x.shape[-1]

        # Patchify: [B, H, W, C] -> [B, g, g, p, p, C] -> Linear -> [B, N, D].
        patches = x.reshape(b, g, p, g, p, channels).transpose(0, 1, 3, 2, 4, 5)
        x_embedder = Linear(
            d,
            ("conv_h", "conv_w", "channels_in", "embed"),
            in_dims=3,
            dtype=self.dtype,
            bias_init=_patch_bias_init(p * p * channels),
            name="x_embedder",
        )
        h = x_embedder(patches).reshape(b, g * g, d)
        h = h + sincos_pos_embed_2d(d, g, g, self.pos_interpolation_scale).astype(h.dtype)
        h = nn.with_logical_constraint(h, ACTIVATION_AXES)

        # The conditioning vector c [B, D]: a sum of embeddings.
        c = TimestepEmbedder(
            d, freq_shift=self.timestep_freq_shift, dtype=self.dtype, name="t_embedder"
        )(t)
        if self.num_classes:
            c = c + LabelEmbedder(
                self.num_classes,
                d,
                self.class_dropout_prob > 0,
                dtype=self.dtype,
                name="y_embedder",
            )(cond["label"])
        if self.pooled_dim is not None:
            pooled_embedder = Mlp(
                d, out_features=d, activation="silu", dtype=self.dtype, name="pooled_embedder"
            )
            c = c + pooled_embedder(cond["pooled"])
        if self.noise_level_conditioning:
            c = c + TimestepEmbedder(
                d,
                freq_shift=self.timestep_freq_shift,
                dtype=self.dtype,
                name="noise_level_embedder",
            )(cond["noise_level"])

        context = None
        if self.context_dim is not None:
            caption_projection = Mlp(
                d, out_features=d, dtype=self.dtype, name="caption_projection"
            )
            context = caption_projection(cond["context"])
            context = nn.with_logical_constraint(context, ACTIVATION_AXES)

        if self.adaln == "single":  # one modulation for all blocks; the final layer takes c itself
            block_c = Linear(
                6 * d,
                ("embed", "modulation"),
                dtype=self.dtype,
                kernel_init=nn.initializers.normal(0.02),
                name="adaln_single",
            )(nn.silu(c))
            final_c = jnp.concatenate([c, c], axis=-1)
        else:
            block_c = final_c = nn.silu(c)  # every adaLN modulation starts with SiLU; apply it once

        block_cls = DiTBlock
        if self.remat:
            block_cls = nn.remat(
                DiTBlock, policy=getattr(jax.checkpoint_policies, self.remat_policy)
            )
        for i in range(self.depth):
            h = block_cls(
                self.num_heads,
                mlp_ratio=self.mlp_ratio,
                qk_norm=self.qk_norm,
                mlp_norm_eps=self.mlp_norm_eps,
                adaln=self.adaln,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(h, block_c, context, cond.get("context_mask"))

        final_layer = FinalLayer(
            p, self.out_channels, adaln=self.adaln, dtype=self.dtype, name="final_layer"
        )
        out = final_layer(h, final_c)
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
