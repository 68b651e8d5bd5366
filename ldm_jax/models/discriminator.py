"""PatchGAN discriminator of the LDM autoencoder recipe (pix2pix / taming `NLayerDiscriminator`), NHWC.

Layers (4x4 kernels, padding 1 everywhere, LeakyReLU slope 0.2):

    conv(ndf, stride 2) -> lrelu
    for n in 1 .. n_layers-1:  conv(ndf * min(2^n, 8), stride 2) -> norm -> lrelu
    conv(ndf * min(2^n_layers, 8), stride 1) -> norm -> lrelu
    conv(1, stride 1)                                         (one logit per patch)

x: [B, H, W, C] -> logits [B, h, w, 1]; H = 256 with n_layers = 3 gives 30x30 patches.

`norm` chooses the normalisation:
- 'group' (default): GroupNorm(`norm_groups`, eps 1e-5). Stateless and per-sample, which is what a
  pure jit train step wants: no mutable collection to thread through the generator and discriminator
  steps and the checkpoint, no train/eval switch, a sample's logits do not depend on the rest of the
  batch (so gradient accumulation over micro-batches gives the full-batch gradient, and real and fake
  batches cannot be told apart by their batch statistics), and nothing to synchronise across devices.
- 'batch': taming's choice, torch `BatchNorm2d` exactly (`BatchNorm` below). Convs before it have no
  bias. Call with `train=True` and `mutable=['batch_stats']`: batch statistics normalise and the
  running averages move; `train=False` uses the running averages. `apply_discriminator` does this.
- 'none': no normalisation.

Initialisation is taming's `weights_init`: conv kernels N(0, 0.02), BatchNorm scale N(1, 0.02) and
bias 0; conv biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights_init leaves
them); GroupNorm scale 1, bias 0.

Submodules are `conv_{k}` for the k-th conv (k = 0 .. n_layers + 1) and `norm_{k}` for the norm after
conv k. In taming's `main` Sequential conv 0 is `main.0`, conv k >= 1 is `main.{3k-1}` and its norm
`main.{3k}`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.conv_blocks import BIAS_AXES, CONV_KERNEL_AXES, NORM_AXES

Dtype = Any

NORMS = ("group", "batch", "none")

_KERNEL = 4
_PADDING = ((1, 1), (1, 1))


def _torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Conv2d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _normal(mean: float, stddev: float) -> nn.initializers.Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return mean + stddev * jax.random.normal(key, shape, dtype)

    return init


class BatchNorm(nn.Module):
    """torch `BatchNorm2d` (eps 1e-5, momentum 0.1) over NHWC. x: [B, H, W, C] -> [B, H, W, C].

    train=True: normalises with the batch mean and biased variance over (B, H, W) and moves the
    running averages (collection 'batch_stats': `mean`, `var`) as torch does, the variance with the
    unbiased estimate; under jit with a batch-sharded x the statistics are those of the global batch
    (as torch's SyncBatchNorm). train=False: normalises with the running averages.
    Statistics are computed in float32.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(_normal(1.0, 0.02), NORM_AXES), (c,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, NORM_AXES), (c,),
                          self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean",
                                nn.with_logical_partitioning(nn.initializers.zeros, NORM_AXES),
                                None, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var",
                               nn.with_logical_partitioning(nn.initializers.ones, NORM_AXES),
                               None, (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if train:
            mean = jnp.mean(x32, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
            if not self.is_initializing():
                n = x.size // c
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (see the module docstring). x: [B, H, W, C] -> logits [B, h, w, 1].

    `train` only matters for norm='batch' (batch statistics vs running averages).
    """

    ndf: int = 64
    n_layers: int = 3
    norm: str = "group"
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _validate(self)
        super().__post_init__()

    @property
    def channels(self) -> tuple[int, ...]:
        """Output channels of convs 0 .. n_layers (the last conv has 1)."""
        return tuple(self.ndf * min(2**n, 8) for n in range(self.n_layers + 1))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"NLayerDiscriminator expects x: [B, H, W, C], got shape {tuple(x.shape)}")
        x = nn.leaky_relu(self._conv(x, self.channels[0], 2, True, 0), 0.2)
        for k in range(1, self.n_layers + 1):
            stride = 2 if k < self.n_layers else 1
            x = self._conv(x, self.channels[k], stride, self.norm != "batch", k)
            x = nn.leaky_relu(self._norm(k, x, train), 0.2)
        return self._conv(x, 1, 1, True, self.n_layers + 1)

    def _conv(self, x: jax.Array, features: int, stride: int, use_bias: bool, k: int) -> jax.Array:
        fan_in = _KERNEL * _KERNEL * x.shape[-1]
        return nn.Conv(
            features,
            (_KERNEL, _KERNEL),
            strides=stride,
            padding=_PADDING,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(_normal(0.0, 0.02), CONV_KERNEL_AXES),
            bias_init=nn.with_logical_partitioning(_torch_bias_init(fan_in), BIAS_AXES),
            name=f"conv_{k}",
        )(x)

    def _norm(self, k: int, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{k}")
        if self.norm == "batch":
            return BatchNorm(**kw)(x, train)
        if self.norm == "group":
            return nn.GroupNorm(
                num_groups=self.norm_groups,
                epsilon=1e-5,
                use_fast_variance=False,  # two-pass variance, as torch.nn.GroupNorm
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, NORM_AXES),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, NORM_AXES),
                **kw,
            )(x)
        return x


def apply_discriminator(
    module: nn.Module,
    params: Any,
    state: Mapping[str, Any],
    x: jax.Array,
    train: bool = True,
) -> tuple[jax.Array, dict[str, Any]]:
    """Logits of `module` (NLayerDiscriminator or any module called as `module(x, train=...)`) on x.

    params: the 'params' collection; state: the other collections ({} unless norm='batch', then
    {'batch_stats': ...}), unboxed. x: [B, H, W, C] -> (logits [B, h, w, 1], new state). With
    train=True and a non-empty state the state collections are mutable and come back updated.
    """
    variables = {"params": params, **state}
    if train and state:
        logits, updates = module.apply(variables, x, train=True, mutable=list(state))
        return logits, {**state, **updates}
    return module.apply(variables, x, train=train), dict(state)


def _validate(m: NLayerDiscriminator) -> None:
    def positive_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0

    for field in ("ndf", "n_layers", "norm_groups"):
        if not positive_int(getattr(m, field)):
            raise ValueError(f"NLayerDiscriminator.{field}={getattr(m, field)!r} must be a positive int")
    if m.norm not in NORMS:
        raise ValueError(f"NLayerDiscriminator.norm={m.norm!r}: allowed values are {NORMS}")
    if m.norm == "group":
        bad = [c for c in m.channels[1:] if c % m.norm_groups]
        if bad:
            raise ValueError(
                f"NLayerDiscriminator.norm_groups={m.norm_groups} does not divide the normalised "
                f"channels {bad} (of {m.channels[1:]}, from ndf={m.ndf}, n_layers={m.n_layers})"
            )
