"""The latent-diffusion / Stable Diffusion U-Net: diffusers' `UNet2DConditionModel`, NHWC, Flax Linen.

Operation for operation diffusers' model, so its weights load unchanged (`ldm_jax.convert.unet`):

    x [B, H, W, C] (+ y["concat"]) -> conv_in -> skips = [h]
    emb = time_embedding(sinusoid(t)) (+ class_embedding(label or noise level))
          (+ add_embedding([pooled, sinusoid(time_ids)])   SDXL's addition_embed_type="text_time")
    down_blocks_i: layers_per_block x (ResnetBlock(h, emb) [-> Transformer2D(h, context)]), each
                   output pushed to skips; a stride-2 conv (downsamplers_0) but on the last level
    mid_block:     resnet -> Transformer2D -> resnet (UNetMidBlock2DCrossAttn), or one resnet
                   (UNetMidBlock2D), or nothing
    up_blocks_i:   layers_per_block + 1 x (ResnetBlock(concat[h, skips.pop()], emb)
                   [-> Transformer2D]), nearest x2 + conv (upsamplers_0) but on the last level
    -> GroupNorm, SiLU, conv_out -> [B, H, W, C']

Transformer2D: GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or a linear with
`use_linear_projection`) -> transformer_layers_per_block x BasicTransformerBlock (LayerNorm ->
self-attention, LayerNorm -> cross-attention to the context, LayerNorm -> GEGLU feed-forward, each
residual; q/k/v without bias) -> proj_out, + the input. `attention_head_dim` is, as in diffusers'
config, the NUMBER of heads per level (an int or one per level).

Conditioning (`y`, a dict; keys as the DiT's, `condition_fields()` says which a config takes):
    "label"        [B] int                 num_class_embeds (class-conditional U-Nets)
    "noise_level"  [B]                     noise_level_conditioning: the class embedding reads the
                                           noise-augmentation level instead (SD x4 upscaler: an
                                           int table row; class_embed_type="timestep": sinusoid)
    "context"      [B, L, cross_attention_dim]   any cross-attention block; "context_mask" [B, L]
                                           (optional, False = padding) as in the DiT
    "pooled"       [B, pooled_dim]         addition_embed_type="text_time" (SDXL's text_embeds)
    "time_ids"     [B, num_time_ids]       addition_embed_type="text_time" (6 for SDXL base: original
                                           size, crop top-left, target size; 5 for the refiner)
    "concat"       [B, h, w, concat_channels]  appended to x before conv_in (inpainting: mask +
                                           masked-image latents; upscaler: the low-res image);
                                           other sizes are bilinearly resized to x's
`in_channels` is the channel count of x (the latents), diffusers' `in_channels` is
in_channels + concat_channels. Label dropout is done outside the model, as for the DiT: with
`class_dropout_prob > 0` the last table row is the null class (num_classes = num_class_embeds - 1).

Parameter names are diffusers' state-dict names with `.k` written `_k` (`down_blocks_0`,
`attn1/...`), except where layers are shared with the DiT (`ldm_jax.models.layers`): fused
self-attention qkv [D, 3, H, Dh], cross-attention q [D, H, Dh] and kv [Dc, 2, H, Dh], output proj
[H, Dh, D]; TimestepEmbedder / Mlp fc1, fc2 (diffusers' linear_1, linear_2); the label table
`class_embedding/embedding_table`. ResNets, resamplers and norms are the VAE's
(`ldm_jax.models.conv_blocks`); the transformer blocks are in `ldm_jax.models.spatial_transformer`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.conv_blocks import Downsample, ResnetBlock, Upsample, conv, group_norm
from ldm_jax.models.layers import (
    ACTIVATION_AXES, LabelEmbedder, Mlp, TimestepEmbedder, checked_conditions, timestep_embedding,
)
from ldm_jax.models.spatial_transformer import Transformer2D, remat_class

Dtype = Any

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
CLASS_EMBED_TYPES = (None, "timestep")
ADDITION_EMBED_TYPES = (None, "text_time")
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)
MAP_AXES = ("activation_batch", "activation_height", "activation_width", "activation_embed")
# Fields that hold one value per level (a single value is broadcast to every level).
_PER_LEVEL = ("attention_head_dim", "transformer_layers_per_block")
_SEQUENCES = ("block_out_channels", "down_block_types", "up_block_types", "sample_size")


class UNetBlock(nn.Module):
    """One level of the U-Net: a down block (`up=False`: DownBlock2D / CrossAttnDownBlock2D) or an
    up block (`up=True`: UpBlock2D / CrossAttnUpBlock2D), or the mid block (`mid=True`).

    Down: (h [B, H, W, Cin], temb, context, mask) -> (h' [B, H/2 or H, ..., out], the skips: each
    resnet(+attention) output and the downsampled map). Up: takes `skips` (the last ones of the
    down path, consumed from the end) and concatenates one to h before each resnet.
    Mid: resnet, then (attention, resnet) when `attention`, channels kept.
    """

    out_channels: int
    num_layers: int
    attention: bool
    num_heads: int
    transformer_layers: int
    resample: bool
    groups: int
    eps: float
    use_linear_projection: bool
    downsample_padding: int = 1
    up: bool = False
    mid: bool = False
    dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"

    @nn.compact
    def __call__(
        self,
        h: jax.Array,
        temb: jax.Array,
        context: jax.Array | None,
        context_mask: jax.Array | None,
        skips: Sequence[jax.Array] = (),
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        resnet = remat_class(ResnetBlock, self.remat, self.remat_policy)
        skips, outputs = list(skips), []

        def attention(x: jax.Array, j: int) -> jax.Array:
            return Transformer2D(
                self.num_heads,
                self.transformer_layers,
                self.groups,
                self.use_linear_projection,
                dtype=self.dtype,
                remat=self.remat,
                remat_policy=self.remat_policy,
                name=f"attentions_{j}",
            )(x, context, context_mask)

        if self.mid:
            h = resnet(self.out_channels, self.groups, self.eps, name="resnets_0", **kw)(h, temb)
            if self.attention:
                h = attention(h, 0)
                h = resnet(self.out_channels, self.groups, self.eps, name="resnets_1", **kw)(
                    h, temb
                )
            return nn.with_logical_constraint(h, MAP_AXES), ()
        for j in range(self.num_layers):
            if self.up:
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
            h = resnet(self.out_channels, self.groups, self.eps, name=f"resnets_{j}", **kw)(
                h, temb
            )
            if self.attention:
                h = attention(h, j)
            h = nn.with_logical_constraint(h, MAP_AXES)
            outputs.append(h)
        if self.resample and self.up:
            h = Upsample(name="upsamplers_0", **kw)(h)
        elif self.resample:
            h = Downsample(self.downsample_padding, name="downsamplers_0", **kw)(h)
            outputs.append(h)
        return h, tuple(outputs)


class UNet2DConditionModel(nn.Module):
    """The U-Net. __call__(x [B, H, W, in_channels], t [B] float, y) -> [B, H, W, out_channels].

    Fields are diffusers' config names (module docstring for the differences: `in_channels`,
    `concat_channels`, `learn_sigma`, `noise_level_conditioning`, `num_time_ids`,
    `class_dropout_prob`). H and W: any multiple of 2^(levels - 1) (`sample_size` only sets
    `sample_shape`, the size the trainer and sampler use). Output float32 whatever `dtype`.
    """

    sample_size: int | tuple[int, int] = 64
    in_channels: int = 4
    concat_channels: int = 0
    learn_sigma: bool = False
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    down_block_types: Sequence[str] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: Sequence[str] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: int = 2
    transformer_layers_per_block: int | Sequence[int] = 1
    attention_head_dim: int | Sequence[int] = 8  # the number of heads, as in diffusers' config
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    num_class_embeds: int | None = None
    class_embed_type: str | None = None
    class_dropout_prob: float = 0.0
    noise_level_conditioning: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    num_time_ids: int = 6
    dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"

    def __post_init__(self):
        for field in _SEQUENCES + _PER_LEVEL:  # lists (config files) -> tuples (hashable)
            value = getattr(self, field)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, field, tuple(value))
        _validate(self)
        super().__post_init__()

    # ------------------------------------------------------------------ the backbone interface

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        h, w = (self.sample_size,) * 2 if isinstance(self.sample_size, int) else self.sample_size
        return (h, w, self.in_channels)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_classes(self) -> int:
        """Classes of y["label"] (0: none); the null class, if any, is the last table row."""
        if self.noise_level_conditioning or not self.num_class_embeds:
            return 0
        return self.num_class_embeds - int(self.class_dropout_prob > 0)

    @property
    def pooled_dim(self) -> int | None:
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - (
            self.num_time_ids * self.addition_time_embed_dim
        )

    @property
    def context_dim(self) -> int | None:
        """The cross-attention context width, None when no block attends."""
        cross = any("CrossAttn" in b for b in self.down_block_types + self.up_block_types)
        cross = cross or self.mid_block_type == "UNetMidBlock2DCrossAttn"
        return self.cross_attention_dim if cross else None

    def levels(self, field: str) -> tuple[int, ...]:
        """A per-level field (attention_head_dim, transformer_layers_per_block) as one per level."""
        value = getattr(self, field)
        return (value,) * len(self.block_out_channels) if isinstance(value, int) else tuple(value)

    def condition_fields(self) -> dict[str, tuple[str, tuple[int | str, ...]]]:
        """The keys `y` takes under this config -> (the field enabling it, the expected shape)."""
        spec: dict[str, tuple[str, tuple[int | str, ...]]] = {}
        if self.num_classes:
            spec["label"] = (f"num_class_embeds={self.num_class_embeds}", ("B",))
        if self.context_dim is not None:
            field = f"cross_attention_dim={self.cross_attention_dim}"
            spec["context"] = (field, ("B", "L", self.cross_attention_dim))
            spec["context_mask"] = (field, ("B", "L"))
        if self.pooled_dim is not None:
            field = "addition_embed_type='text_time'"
            spec["pooled"] = (field, ("B", self.pooled_dim))
            spec["time_ids"] = (field, ("B", self.num_time_ids))
        if self.concat_channels:
            channels = self.concat_channels
            spec["concat"] = (f"concat_channels={channels}", ("B", "h", "w", channels))
        if self.noise_level_conditioning:
            spec["noise_level"] = ("noise_level_conditioning=True", ("B",))
        return spec

    def _conditions(self, x: jax.Array, t: jax.Array, y: Any) -> dict[str, jax.Array]:
        """Checks x, t and y against the config; returns y as a dict (labels -> {"label": y})."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"UNet2DConditionModel input x must be [B, H, W, in_channels="
                f"{self.in_channels}], got shape {tuple(x.shape)}"
            )
        factor = 2 ** (len(self.block_out_channels) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"UNet2DConditionModel input is {x.shape[1]}x{x.shape[2]}: H and W must be "
                f"multiples of {factor} = 2^(len(block_out_channels) - 1)"
            )
        if t.shape != x.shape[:1]:
            raise ValueError(f"UNet2DConditionModel t must be [B]={x.shape[:1]}, got {t.shape}")
        cond, _ = checked_conditions("UNet2DConditionModel", self.condition_fields(), y, x.shape[0])
        return cond

    # ------------------------------------------------------------------ the network

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: Any = None) -> jax.Array:
        cond = self._conditions(x, t, y)
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        channels = tuple(self.block_out_channels)
        time_dim = self.time_embedding_dim or 4 * channels[0]
        sinusoid = dict(freq_shift=self.freq_shift, flip_sin_to_cos=self.flip_sin_to_cos)

        # The embedding emb [B, time_dim]: a sum.
        emb = TimestepEmbedder(
            time_dim, channels[0], dtype=self.dtype, name="time_embedding", **sinusoid
        )(t)
        if self.class_embed_type == "timestep":
            emb = emb + TimestepEmbedder(
                time_dim, channels[0], dtype=self.dtype, name="class_embedding", **sinusoid
            )(cond["noise_level"])
        elif self.num_class_embeds:
            labels = cond["noise_level" if self.noise_level_conditioning else "label"]
            table = LabelEmbedder(
                self.num_class_embeds, time_dim, False, dtype=self.dtype, name="class_embedding"
            )
            emb = emb + table(jnp.asarray(labels).astype(jnp.int32))
        if self.addition_embed_type == "text_time":
            time_ids = jnp.asarray(cond["time_ids"])
            time_embeds = timestep_embedding(
                time_ids.reshape(-1), self.addition_time_embed_dim, **sinusoid
            ).reshape(time_ids.shape[0], -1)
            added = jnp.concatenate(
                [jnp.asarray(cond["pooled"]).astype(jnp.float32), time_embeds], axis=-1
            )
            emb = emb + Mlp(
                time_dim,
                out_features=time_dim,
                activation="silu",
                dtype=self.dtype,
                name="add_embedding",
            )(added)

        context, context_mask = cond.get("context"), cond.get("context_mask")
        if context is not None:
            context = nn.with_logical_constraint(jnp.asarray(context), ACTIVATION_AXES)
        if self.concat_channels:
            extra = jnp.asarray(cond["concat"]).astype(x.dtype)
            if extra.shape[1:3] != x.shape[1:3]:
                extra = jax.image.resize(extra, x.shape[:3] + extra.shape[3:], "bilinear")
            x = jnp.concatenate([x, extra], axis=-1)

        h = conv(channels[0], self.conv_in_kernel, "conv_in", **kw)(x)
        h = nn.with_logical_constraint(h, MAP_AXES)
        heads, layers = self.levels("attention_head_dim"), self.levels("transformer_layers_per_block")
        common = dict(
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            use_linear_projection=self.use_linear_projection,
            dtype=self.dtype,
            remat=self.remat,
            remat_policy=self.remat_policy,
        )
        skips = [h]
        last = len(channels) - 1
        for i, kind in enumerate(self.down_block_types):
            h, outputs = UNetBlock(
                channels[i],
                self.layers_per_block,
                kind == "CrossAttnDownBlock2D",
                heads[i],
                layers[i],
                resample=i != last,
                downsample_padding=self.downsample_padding,
                name=f"down_blocks_{i}",
                **common,
            )(h, emb, context, context_mask)
            skips += outputs
        if self.mid_block_type is not None:
            h, _ = UNetBlock(
                channels[-1],
                1,
                self.mid_block_type == "UNetMidBlock2DCrossAttn",
                heads[-1],
                layers[-1],
                resample=False,
                mid=True,
                name="mid_block",
                **common,
            )(h, emb, context, context_mask)
        for i, kind in enumerate(self.up_block_types):
            n = self.layers_per_block + 1
            h, _ = UNetBlock(
                channels[last - i],
                n,
                kind == "CrossAttnUpBlock2D",
                heads[last - i],
                layers[last - i],
                resample=i != last,
                up=True,
                name=f"up_blocks_{i}",
                **common,
            )(h, emb, context, context_mask, tuple(skips[-n:]))
            skips = skips[:-n]

        h = nn.silu(group_norm(self.norm_num_groups, "conv_norm_out", eps=self.norm_eps, **kw)(h))
        out = conv(self.out_channels, self.conv_out_kernel, "conv_out", **kw)(h)
        return out.astype(jnp.float32)


def example_inputs(model: UNet2DConditionModel, batch: int = 1) -> tuple[jax.Array, ...]:
    """Zeros (x, t, y) for `model.init` / `jax.eval_shape`: the smallest map, one context token."""
    f = 2 ** (len(model.block_out_channels) - 1)
    sizes = {"B": batch, "L": 1, "h": f, "w": f}
    dtypes = {"label": jnp.int32, "context_mask": jnp.bool_}
    y = {
        key: jnp.zeros([sizes.get(d, d) for d in dims], dtypes.get(key, jnp.float32))
        for key, (_, dims) in model.condition_fields().items()
        if key != "context_mask"
    }
    return jnp.zeros((batch, f, f, model.in_channels)), jnp.zeros((batch,)), y or None


def _validate(m: UNet2DConditionModel) -> None:
    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    name = "UNet2DConditionModel"
    channels = m.block_out_channels
    levels = len(channels) if isinstance(channels, tuple) else 0
    if not levels or not all(positive_int(c) for c in channels):
        raise ValueError(f"{name}.block_out_channels={channels!r} must be positive ints")
    for field, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        value = getattr(m, field)
        if not isinstance(value, tuple) or len(value) != levels or not set(value) <= set(allowed):
            raise ValueError(
                f"{name}.{field}={value!r} must be {levels} (len(block_out_channels)) of {allowed}"
            )
    choices = (
        ("mid_block_type", MID_BLOCK_TYPES),
        ("class_embed_type", CLASS_EMBED_TYPES),
        ("addition_embed_type", ADDITION_EMBED_TYPES),
        ("remat_policy", REMAT_POLICIES),
        ("downsample_padding", (0, 1)),
    )
    for field, allowed in choices:
        if getattr(m, field) not in allowed:
            raise ValueError(f"{name}.{field}={getattr(m, field)!r} is not one of {allowed}")
    positive = ("in_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups",
                "num_time_ids")
    for field in positive:
        if not positive_int(getattr(m, field)):
            raise ValueError(f"{name}.{field}={getattr(m, field)!r} must be a positive int")
    if not (isinstance(m.concat_channels, int) and m.concat_channels >= 0):
        raise ValueError(f"{name}.concat_channels={m.concat_channels!r} must be an int >= 0")
    for field in ("conv_in_kernel", "conv_out_kernel"):
        if not positive_int(getattr(m, field)) or getattr(m, field) % 2 == 0:
            raise ValueError(f"{name}.{field}={getattr(m, field)!r} must be a positive odd int")
    for field in _PER_LEVEL:
        values = m.levels(field)
        if len(values) != levels or not all(positive_int(v) for v in values):
            raise ValueError(
                f"{name}.{field}={getattr(m, field)!r} must be a positive int or {levels} of them"
            )
    bad = [c for c in channels if c % m.norm_num_groups]
    if bad:
        raise ValueError(f"{name}.norm_num_groups={m.norm_num_groups} does not divide {bad}")
    size = m.sample_size
    if not (positive_int(size) or (isinstance(size, tuple) and len(size) == 2
                                   and all(positive_int(s) for s in size))):
        raise ValueError(f"{name}.sample_size={size!r} must be a positive int or (height, width)")
    if m.num_class_embeds is not None and not positive_int(m.num_class_embeds):
        raise ValueError(f"{name}.num_class_embeds={m.num_class_embeds!r} must be None or > 0")
    if m.class_embed_type == "timestep":
        if m.num_class_embeds is not None or not m.noise_level_conditioning:
            raise ValueError(
                f"{name}.class_embed_type='timestep' embeds y['noise_level'] like t: it needs "
                "noise_level_conditioning=True and num_class_embeds=None"
            )
    elif m.noise_level_conditioning and not m.num_class_embeds:
        raise ValueError(
            f"{name}.noise_level_conditioning=True needs num_class_embeds (a table row per level) "
            "or class_embed_type='timestep'"
        )
    if not 0.0 <= m.class_dropout_prob < 1.0:
        raise ValueError(f"{name}.class_dropout_prob={m.class_dropout_prob} must be in [0, 1)")
    if m.addition_embed_type == "text_time":
        for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if not positive_int(getattr(m, field)):
                raise ValueError(
                    f"{name}.{field}={getattr(m, field)!r} must be a positive int with "
                    "addition_embed_type='text_time'"
                )
        if m.pooled_dim <= 0:
            raise ValueError(
                f"{name}.projection_class_embeddings_input_dim="
                f"{m.projection_class_embeddings_input_dim} leaves no pooled text after "
                f"num_time_ids={m.num_time_ids} x addition_time_embed_dim={m.addition_time_embed_dim}"
            )
