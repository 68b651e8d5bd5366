"""The KL autoencoder of latent diffusion (Stable Diffusion's VAE), NHWC, Flax Linen.

Matches diffusers' `AutoencoderKL` (Encoder / Decoder with DownEncoderBlock2D, UpDecoderBlock2D and
UNetMidBlock2D) operation for operation, so its weights load unchanged (`ldm_jax.convert.vae`):

- GroupNorm (eps 1e-6) + SiLU before every 3x3 conv of a ResNet block; a 1x1 `conv_shortcut` when
  the channel count changes;
- downsampling pads the right/bottom edge by one, then a stride-2 3x3 conv without padding;
- upsampling is nearest-neighbour x2, then a 3x3 conv;
- the mid block is resnet -> single-head self-attention over all channels (GroupNorm, q/k/v,
  output projection, residual) -> resnet;
- the decoder has `layers_per_block + 1` resnets per level, channels in reverse order.

Submodule names are diffusers' state-dict names with `.k` written `_k` (`down_blocks_0`,
`to_out_0`), which is all the weight converter relies on.

The encoder returns a `DiagonalGaussian` posterior; `scaling_factor` / `shift_factor` are NOT
applied inside `encode` / `decode`: callers use `scale_latents` / `unscale_latents`.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.conv_blocks import ConvLayer, Downsample, ResnetBlock, Upsample, conv, dense, group_norm

Dtype = Any

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# Stable Diffusion 1.x/2.x VAE (stabilityai/sd-vae-ft-ema, sd-vae-ft-mse; `first_stage_model` of the
# SD checkpoints). Field names are diffusers' `AutoencoderKL` config names.
SD_VAE_CONFIG: Mapping[str, Any] = MappingProxyType(
    dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
        scaling_factor=0.18215,
        shift_factor=None,
    )
)


# ----------------------------------------------------------------------------- posterior


@flax.struct.dataclass
class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x), float32.

    mean, logvar: [B, h, w, C]; logvar is clamped to [-30, 20] on construction (`from_moments`).
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """moments: [B, h, w, 2C] (mean channels first, then log-variance), as the encoder emits."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """z = mean + std * eps, eps ~ N(0, I) drawn from `key`. Returns [B, h, w, C]."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> jax.Array:
        """KL(self || other) (other = N(0, I) when None), summed over h, w, C. Returns [B]."""
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=axes)

    def nll(self, sample: jax.Array) -> jax.Array:
        """Negative log-likelihood of `sample` [B, h, w, C], summed over h, w, C. Returns [B]."""
        axes = tuple(range(1, self.mean.ndim))
        terms = math.log(2.0 * math.pi) + self.logvar + jnp.square(sample - self.mean) / self.var
        return 0.5 * jnp.sum(terms, axis=axes)


def scale_latents(
    z: jax.Array, scaling_factor: float, shift_factor: float | None = None
) -> jax.Array:
    """VAE latents -> diffusion-model latents: (z - shift) * scale."""
    return (z - (shift_factor or 0.0)) * scaling_factor


def unscale_latents(
    z: jax.Array, scaling_factor: float, shift_factor: float | None = None
) -> jax.Array:
    """Diffusion-model latents -> VAE latents (inverse of `scale_latents`): z / scale + shift."""
    return z / scaling_factor + (shift_factor or 0.0)


# ----------------------------------------------------------------------------- layers


class AttentionBlock(ConvLayer):
    """Single-head self-attention over all H*W positions with all channels; residual.

    x: [B, H, W, C] -> [B, H, W, C]. diffusers `Attention(_from_deprecated_attn_block=True)`.
    """

    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = self.dtypes
        b, h, w, c = x.shape
        y = group_norm(self.groups, "group_norm", **kw)(x).reshape(b, h * w, 1, c)
        q, k, v = (dense(c, name, **kw)(y) for name in ("to_q", "to_k", "to_v"))
        y = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(C), one head
        y = dense(c, "to_out_0", **kw)(y.reshape(b, h * w, c))
        return x + y.reshape(b, h, w, c)


_RematResnetBlock = nn.remat(ResnetBlock)


def _resnet_cls(remat: bool) -> type[nn.Module]:
    return _RematResnetBlock if remat else ResnetBlock


class ResnetStack(ConvLayer):
    """`num_layers` resnets, then an optional resampler: diffusers' DownEncoderBlock2D
    (`resample="down"`) / UpDecoderBlock2D (`resample="up"`). [B, H, W, Cin] -> [B, H', W', out]."""

    out_channels: int
    num_layers: int
    resample: str | None  # None, "down" or "up"
    groups: int
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = self.dtypes
        resnet = _resnet_cls(self.remat)
        for j in range(self.num_layers):
            x = resnet(self.out_channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample(name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample(name="upsamplers_0", **kw)(x)
        return x


class MidBlock(ConvLayer):
    """resnet -> attention (optional) -> resnet, channels kept. [B, H, W, C] -> [B, H, W, C]."""

    groups: int
    add_attention: bool = True
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = self.dtypes
        resnet = _resnet_cls(self.remat)
        c = x.shape[-1]
        x = resnet(c, self.groups, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, name="attentions_0", **kw)(x)
        return resnet(c, self.groups, name="resnets_1", **kw)(x)


class Coder(ConvLayer):
    """diffusers' `Encoder` (`down=True`) or `Decoder` (`down=False`).

    Encoder: image [B, H, W, Cin] -> conv_in -> down_blocks (layers_per_block resnets each, a
    downsample after all but the last) -> mid_block -> norm, SiLU, conv_out -> [B, H/f, W/f, out].
    Decoder: latents [B, h, w, Cin] -> conv_in -> mid_block -> up_blocks (layers_per_block + 1
    resnets each, reversed channels, an upsample after all but the last) -> norm, SiLU, conv_out
    -> [B, h*f, w*f, out]. f = 2^(len(block_out_channels) - 1).
    """

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    down: bool
    mid_block_add_attention: bool = True
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = self.dtypes
        channels = tuple(self.block_out_channels)
        if self.down:
            num_layers, prefix = self.layers_per_block, "down"
        else:
            channels, num_layers, prefix = channels[::-1], self.layers_per_block + 1, "up"
        mid = MidBlock(
            self.groups, self.mid_block_add_attention, self.remat, name="mid_block", **kw
        )
        x = conv(channels[0], 3, "conv_in", **kw)(x)
        if not self.down:
            x = mid(x)
        for i, c in enumerate(channels):
            resample = prefix if i != len(channels) - 1 else None
            stack = ResnetStack(
                c, num_layers, resample, self.groups, self.remat, name=f"{prefix}_blocks_{i}", **kw
            )
            x = stack(x)
        if self.down:
            x = mid(x)
        x = nn.silu(group_norm(self.groups, "conv_norm_out", **kw)(x))
        return conv(self.out_channels, 3, "conv_out", **kw)(x)


# ----------------------------------------------------------------------------- autoencoder

CONFIG_FIELDS: tuple[str, ...] = tuple(SD_VAE_CONFIG)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder, configured with diffusers' `AutoencoderKL` field names.

    `encode(x: [B, H, W, in_channels]) -> DiagonalGaussian` over [B, H/f, W/f, latent_channels],
    `decode(z) -> [B, H, W, out_channels]`, f = `downsample_factor` = 2^(len(block_out_channels)-1).
    `dtype` is the compute dtype (the posterior is always float32); `param_dtype` the storage dtype;
    `remat` recomputes ResNet blocks in the backward pass.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def __post_init__(self):
        _validate_config(self)
        super().__post_init__()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> AutoencoderKL:
        """Builds the model from a config dict with the keys of `SD_VAE_CONFIG` (missing keys take
        diffusers' defaults); `overrides` sets non-config fields such as `dtype` or `remat`."""
        unknown = sorted(set(config) - set(CONFIG_FIELDS))
        if unknown:
            raise ValueError(
                f"AutoencoderKL config has unknown fields {unknown}; allowed: {list(CONFIG_FIELDS)}"
            )
        fields = dict(config)
        if "block_out_channels" in fields:
            fields["block_out_channels"] = tuple(fields["block_out_channels"])
        return cls(**fields, **overrides)

    def to_config(self) -> dict[str, Any]:
        """The architecture/latent config (keys of `SD_VAE_CONFIG`); `from_config` inverts it."""
        config = {name: getattr(self, name) for name in CONFIG_FIELDS}
        config["block_out_channels"] = tuple(config["block_out_channels"])
        return config

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        arch = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            remat=self.remat,
        )
        self.encoder = Coder(out_channels=2 * self.latent_channels, down=True, **arch, **kw)
        self.decoder = Coder(out_channels=self.out_channels, down=False, **arch, **kw)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, 1, None, **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, 1, None, **kw)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x: [B, H, W, in_channels] (images in [-1, 1]) -> posterior over [B, H/f, W/f, latent]."""
        _check_shape(x, self.in_channels, "in_channels", "x", self.downsample_factor)
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """z: [B, h, w, latent_channels] (unscaled latents) -> [B, h*f, w*f, out_channels]."""
        _check_shape(z, self.latent_channels, "latent_channels", "z", 1)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruction of x: [B, H, W, in_channels] through a posterior sample drawn with `key`
        (the posterior mode when `key` is None). Returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior


def _check_shape(x: jax.Array, channels: int, field: str, name: str, factor: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"AutoencoderKL expects {name}: [B, H, W, C], got shape {tuple(x.shape)}")
    if x.shape[-1] != channels:
        raise ValueError(
            f"AutoencoderKL.{field}={channels} but {name} has {x.shape[-1]} channels "
            f"({name}: [B, H, W, C], shape {tuple(x.shape)})"
        )
    if x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(
            f"{name} spatial size {x.shape[1]}x{x.shape[2]} is not divisible by the downsampling "
            f"factor {factor} = 2^(len(AutoencoderKL.block_out_channels) - 1)"
        )


def _validate_config(m: AutoencoderKL) -> None:
    def positive_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0

    channels = m.block_out_channels
    if (
        isinstance(channels, (str, bytes))
        or not isinstance(channels, Sequence)
        or not channels
        or not all(positive_int(c) for c in channels)
    ):
        raise ValueError(
            f"AutoencoderKL.block_out_channels={channels!r} must be a non-empty sequence of "
            "positive ints"
        )
    for field in (
        "in_channels",
        "out_channels",
        "layers_per_block",
        "latent_channels",
        "norm_num_groups",
    ):
        if not positive_int(getattr(m, field)):
            raise ValueError(f"AutoencoderKL.{field}={getattr(m, field)!r} must be a positive int")
    bad = [c for c in channels if c % m.norm_num_groups]
    if bad:
        raise ValueError(
            f"AutoencoderKL.norm_num_groups={m.norm_num_groups} does not divide block_out_channels "
            f"{bad} (of {tuple(channels)})"
        )
    if not (
        isinstance(m.scaling_factor, (int, float))
        and math.isfinite(m.scaling_factor)
        and m.scaling_factor != 0
    ):
        raise ValueError(
            f"AutoencoderKL.scaling_factor={m.scaling_factor!r} must be a finite non-zero number"
        )
    if m.shift_factor is not None and not (
        isinstance(m.shift_factor, (int, float)) and math.isfinite(m.shift_factor)
    ):
        raise ValueError(
            f"AutoencoderKL.shift_factor={m.shift_factor!r} must be None or a finite number"
        )
