"""Losses of the LDM autoencoder recipe (taming / LDM `LPIPSWithDiscriminator`), as pure functions.

Generator (autoencoder) objective; x, reconstructions x^: [B, H, W, C] in [-1, 1]:

    rec      = |x - x^| + perceptual_weight * LPIPS(x, x^)        per element (LPIPS [B] broadcast)
    nll      = sum(rec / exp(logvar) + logvar) / B                weighted_nll: sum(weights * (..)) / B
    kl       = sum_b KL(q(z | x_b) || N(0, I)) / B
    g_loss   = -mean(D(x^))
    d_weight = sg(clip(|grad_W nll| / (|grad_W g_loss| + 1e-4), 0, 1e4)) * disc_weight
    factor   = disc_factor if step >= disc_start else 0           (jnp.where on the traced step)
    loss     = weighted_nll + kl_weight * kl + d_weight * factor * g_loss

W is the decoder's last conv kernel, sg = stop_gradient, d_weight is 0 when disc_factor is 0. The
discriminator objective is factor * hinge|vanilla(D(x), D(sg(x^))). As in LDM, the adaptive weight
uses the unweighted nll. LDM's formula has a learned scalar `logvar`, but LDM's autoencoder optimiser
leaves it out, so there it stays at logvar_init = 0: pass it as a trained leaf or as a constant.

How the adaptive weight is computed, and what it costs
-------------------------------------------------------
grad_W nll and grad_W g_loss are the cotangents dnll/dx^ and dg_loss/dx^ pulled back through the last
layer only, so three pieces keep a generator step at the cost of the loss without the adaptive weight
(one VAE forward + backward, one LPIPS forward + backward, one D forward + backward):

1. `apply_with_param_vjp(decode, params, ('decoder', 'conv_out', 'kernel'), z)` runs the decoder once
   and returns x^ plus a pullback linearised w.r.t. that kernel alone. JAX's linearisation keeps just
   the conv's input as residual, so each pullback is one kernel-gradient convolution (no second
   decoder pass); x^ itself stays differentiable w.r.t. all params for the caller's `jax.grad`.
2. LPIPS(x, x^) and g_loss are functions of x^ alone. `_value_and_input_grad` computes each value
   together with its gradient w.r.t. x^ in the forward pass and, through a custom VJP, hands that
   stored gradient to the outer backward pass. Differentiating a loss that calls `jax.grad` inside
   would instead run the LPIPS and D backward passes twice. LPIPS backpropagates into x^ only: the
   target's VGG taps are computed once, without gradient.
3. dnll/dx^ is then elementwise: the chain rule through |x - x^| and logvar, plus dnll/dLPIPS_b times
   the stored LPIPS input-gradient of sample b.

Use in a train step (`vae` an `AutoencoderKL`, `loss_fn` a `VAELoss`):

    def generator_objective(vae_params, logvar):
        posterior = vae.apply({'params': vae_params}, x, method=vae.encode)
        x_rec, last_layer_vjp = apply_with_param_vjp(
            lambda p, z: vae.apply({'params': p}, z, method=vae.decode),
            vae_params, ('decoder', 'conv_out', 'kernel'), posterior.sample(key))
        return loss_fn.generator_loss(x, x_rec, posterior, logvar, step, last_layer_vjp,
                                      disc_params, disc_state, lpips_params)
    (loss, (disc_state, metrics)), grads = jax.value_and_grad(generator_objective, has_aux=True)(...)
    (d_loss, (disc_state, d_metrics)), d_grads = jax.value_and_grad(loss_fn.discriminator_loss,
        has_aux=True)(disc_params, disc_state, x, x_rec, step)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ldm_jax.models.discriminator import apply_discriminator
from ldm_jax.models.lpips import LPIPS

ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


# ----------------------------------------------------------------------------- loss terms


def reconstruction_loss(
    x: jax.Array,
    x_rec: jax.Array,
    perceptual: jax.Array | None = None,
    perceptual_weight: float = 1.0,
) -> jax.Array:
    """|x - x_rec| + perceptual_weight * perceptual, per element. x, x_rec: [B, H, W, C];
    perceptual: [B] (LPIPS per sample, broadcast over H, W, C) or None. Returns [B, H, W, C]."""
    rec = jnp.abs(x - x_rec)
    if perceptual is not None:
        rec = rec + perceptual_weight * perceptual.reshape((-1,) + (1,) * (rec.ndim - 1))
    return rec


def nll_loss(rec: jax.Array, logvar: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """sum(weights * (rec / exp(logvar) + logvar)) / B (LDM's weighted NLL). rec: [B, ...];
    logvar: scalar; weights: broadcastable to rec, or None. Returns a scalar."""
    nll = rec / jnp.exp(logvar) + logvar
    if weights is not None:
        nll = weights * nll
    return jnp.sum(nll) / rec.shape[0]


def kl_loss(posterior: Any) -> jax.Array:
    """Batch mean of `posterior.kl()` ([B], summed over latent dims), e.g. a `DiagonalGaussian`."""
    kl = posterior.kl()
    return jnp.sum(kl) / kl.shape[0]


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """-mean(D(x_rec)). logits_fake: [B, h, w, 1]."""
    return -jnp.mean(logits_fake)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_rec))))."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


DISC_LOSSES: Mapping[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def adopt_weight(weight: float, step: jax.Array, threshold: int) -> jax.Array:
    """`weight` once step >= threshold, else 0 (taming's adopt_weight); step may be traced."""
    return jnp.where(jnp.asarray(step) >= threshold, jnp.float32(weight), jnp.float32(0.0))


def adaptive_weight(nll_grad: Any, g_grad: Any, disc_weight: float) -> jax.Array:
    """sg(clip(|nll_grad| / (|g_grad| + 1e-4), 0, 1e4)) * disc_weight; the norms are global L2 norms
    of the gradients (arrays or pytrees) of the nll and the generator loss w.r.t. the last layer."""
    ratio = optax.tree.norm(nll_grad) / (optax.tree.norm(g_grad) + ADAPTIVE_WEIGHT_EPS)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_WEIGHT_MAX)) * disc_weight


# ----------------------------------------------------------------------------- gradient plumbing


def _get_path(tree: Any, path: Sequence[str]) -> Any:
    node = tree
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            where = "/".join(path[:i]) or "params"
            keys = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise ValueError(f"last-layer path {'/'.join(path)!r}: {where} has no {key!r} (has {keys})")
        node = node[key]
    return node


def _replace_path(tree: Mapping[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
    head, *rest = path
    return {**tree, head: _replace_path(tree[head], rest, value) if rest else value}


def apply_with_param_vjp(
    apply_fn: Callable[..., jax.Array],
    params: Mapping[str, Any],
    path: Sequence[str],
    *args: Any,
) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """(apply_fn(params, *args), vjp) with vjp(ct) = d<ct, output>/d params[path], e.g. the gradient
    w.r.t. the decoder's last conv kernel of a loss whose gradient w.r.t. the output is ct.

    The pullback is linearised w.r.t. that one leaf only, so for a last layer it stores the layer's
    input and costs one small convolution; the output remains differentiable w.r.t. all of `params`.
    Raises ValueError naming the path when `params` has no such leaf.
    """
    path = tuple(path)
    leaf = _get_path(params, path)
    out, pull = jax.vjp(lambda value: apply_fn(_replace_path(params, path, value), *args), leaf)
    return out, lambda ct: pull(ct.astype(out.dtype))[0]


def _value_and_input_grad(
    fn: Callable[[jax.Array, Any], tuple[jax.Array, Any]], x: jax.Array, consts: Any
) -> tuple[jax.Array, jax.Array, Any]:
    """(value, grad, aux) of `fn(x, consts) -> (value, aux)`; grad = d sum(value) / dx.

    value is a scalar, or [B] with value[b] depending on x[b] only (then grad[b] is its gradient).
    Differentiating `value` w.r.t. x afterwards reuses `grad` (a custom VJP), so fn runs one forward
    and one backward pass in all. grad and aux carry no gradient; consts get none. `fn` must not
    close over traced values (pass them in `consts`).
    """

    def forward(x, consts):
        value, pull, aux = jax.vjp(lambda y: fn(y, consts), x, has_aux=True)
        (grad,) = pull(jnp.ones_like(value))
        return value, grad, aux

    @jax.custom_vjp
    def value_grad_aux(x, consts):
        return forward(x, consts)

    def fwd(x, consts):
        out = forward(x, consts)
        return out, out[1]

    def bwd(grad, cotangents):
        ct = cotangents[0]
        ct = ct.reshape(ct.shape + (1,) * (grad.ndim - ct.ndim))
        return ct.astype(grad.dtype) * grad, None

    value_grad_aux.defvjp(fwd, bwd)
    value, grad, aux = value_grad_aux(x, consts)
    return value, jax.lax.stop_gradient(grad), jax.lax.stop_gradient(aux)


# ----------------------------------------------------------------------------- the recipe


@dataclasses.dataclass(frozen=True)
class VAELoss:
    """LDM's `LPIPSWithDiscriminator`: the generator and discriminator objectives (module docstring).

    discriminator: e.g. `NLayerDiscriminator`, called through `apply_discriminator`.
    lpips: the `LPIPS` module (None: no perceptual term, e.g. when `load_lpips_or_none` found no
    weights). Defaults are LDM's KL-autoencoder configs (kl_weight 1e-6, disc_weight 0.5,
    disc_start 50001, hinge loss, perceptual_weight 1, logvar_init 0).
    """

    discriminator: nn.Module
    lpips: LPIPS | None = None
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_start: int = 50001
    disc_loss: str = "hinge"
    logvar_init: float = 0.0

    def __post_init__(self):
        for field in ("kl_weight", "perceptual_weight", "disc_weight", "disc_factor"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"VAELoss.{field}={value!r} must be a finite number >= 0")
        if isinstance(self.disc_start, bool) or not isinstance(self.disc_start, int) or self.disc_start < 0:
            raise ValueError(f"VAELoss.disc_start={self.disc_start!r} must be an int >= 0")
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"VAELoss.disc_loss={self.disc_loss!r}: allowed values are {tuple(DISC_LOSSES)}")
        if not (isinstance(self.logvar_init, (int, float)) and math.isfinite(self.logvar_init)):
            raise ValueError(f"VAELoss.logvar_init={self.logvar_init!r} must be a finite number")

    @property
    def uses_lpips(self) -> bool:
        return self.lpips is not None and self.perceptual_weight > 0

    def init_logvar(self) -> jax.Array:
        """The scalar log-variance of the NLL at its initial value (float32)."""
        return jnp.full((), self.logvar_init, jnp.float32)

    def _perceptual(self, y: jax.Array, consts: tuple[Any, Any]) -> tuple[jax.Array, None]:
        params, target_taps = consts
        taps = self.lpips.apply({"params": params}, y, method=LPIPS.features)
        return self.lpips.apply({"params": params}, target_taps, taps, method=LPIPS.distance), None

    def _adversarial(self, y: jax.Array, consts: tuple[Any, Any]) -> tuple[jax.Array, Any]:
        params, state = consts
        logits, state = apply_discriminator(self.discriminator, params, state, y)
        return generator_adversarial_loss(logits), state

    def _nll_input_grad(self, x, x_rec, logvar, perceptual, perceptual_grad) -> jax.Array:
        """d(unweighted nll)/dx_rec [B, H, W, C], LPIPS entering through its stored input-gradient."""
        x_rec, logvar = jax.lax.stop_gradient((x_rec, logvar))
        if perceptual is None:
            return jax.grad(lambda y: nll_loss(reconstruction_loss(x, y), logvar))(x_rec)
        perceptual = jax.lax.stop_gradient(perceptual)
        grad_x, grad_p = jax.grad(
            lambda y, p: nll_loss(reconstruction_loss(x, y, p, self.perceptual_weight), logvar), (0, 1)
        )(x_rec, perceptual)
        return grad_x + grad_p.reshape((-1,) + (1,) * (x_rec.ndim - 1)) * perceptual_grad

    def generator_loss(
        self,
        x: jax.Array,
        x_rec: jax.Array,
        posterior: Any,
        logvar: jax.Array,
        step: jax.Array,
        last_layer_vjp: Callable[[jax.Array], Any],
        disc_params: Any,
        disc_state: Mapping[str, Any],
        lpips_params: Any = None,
        weights: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[dict[str, Any], dict[str, jax.Array]]]:
        """The autoencoder objective; returns (loss, (disc_state, metrics)).

        x: [B, H, W, C] images, x_rec: [B, H, W, C] their reconstructions (differentiable w.r.t. the
        VAE params); posterior: q(z|x) with `.kl()` -> [B]; logvar: scalar; step: the int step
        (may be traced); last_layer_vjp: [B, H, W, C] cotangent on x_rec -> gradient w.r.t. the
        decoder's last layer (from `apply_with_param_vjp`); disc_params / disc_state: the
        discriminator's 'params' and other collections ({} unless BatchNorm; updated, as in taming,
        by its forward pass here); lpips_params: needed when `uses_lpips`; weights: optional,
        broadcastable to x. Metrics (scalars): total_loss, logvar, kl_loss, nll_loss, rec_loss,
        d_weight, disc_factor, g_loss.
        """
        x = jax.lax.stop_gradient(x.astype(jnp.float32))
        x_rec = x_rec.astype(jnp.float32)
        logvar = jnp.asarray(logvar, jnp.float32)
        perceptual = perceptual_grad = None
        if self.uses_lpips:
            if lpips_params is None:
                raise ValueError("VAELoss.generator_loss: lpips_params is required when VAELoss.lpips is set")
            target_taps = jax.lax.stop_gradient(self.lpips.apply({"params": lpips_params}, x, method=LPIPS.features))
            perceptual, perceptual_grad, _ = _value_and_input_grad(
                self._perceptual, x_rec, (lpips_params, target_taps)
            )
        g_loss, g_grad, disc_state = _value_and_input_grad(self._adversarial, x_rec, (disc_params, disc_state))

        rec = reconstruction_loss(x, x_rec, perceptual, self.perceptual_weight)
        weighted_nll = nll_loss(rec, logvar, weights)
        nll = weighted_nll if weights is None else nll_loss(rec, logvar)
        if self.disc_factor > 0:
            nll_grad = self._nll_input_grad(x, x_rec, logvar, perceptual, perceptual_grad)
            d_weight = adaptive_weight(last_layer_vjp(nll_grad), last_layer_vjp(g_grad), self.disc_weight)
        else:
            d_weight = jnp.zeros((), jnp.float32)
        factor = adopt_weight(self.disc_factor, step, self.disc_start)
        kl = kl_loss(posterior)
        loss = weighted_nll + self.kl_weight * kl + d_weight * factor * g_loss
        metrics = dict(
            total_loss=loss,
            logvar=logvar,
            kl_loss=kl,
            nll_loss=nll,
            rec_loss=jnp.mean(rec),
            d_weight=d_weight,
            disc_factor=factor,
            g_loss=g_loss,
        )
        return loss, (disc_state, jax.lax.stop_gradient(metrics))

    def discriminator_loss(
        self,
        disc_params: Any,
        disc_state: Mapping[str, Any],
        x: jax.Array,
        x_rec: jax.Array,
        step: jax.Array,
    ) -> tuple[jax.Array, tuple[dict[str, Any], dict[str, jax.Array]]]:
        """factor * hinge|vanilla(D(x), D(sg(x_rec))); returns (loss, (disc_state, metrics)).

        Differentiate w.r.t. disc_params. D runs on the real batch, then on the fake one (BatchNorm:
        separate batch statistics, two running-average updates, as taming). Metrics: disc_loss,
        logits_real, logits_fake (means).
        """
        x = jax.lax.stop_gradient(x.astype(jnp.float32))
        x_rec = jax.lax.stop_gradient(x_rec.astype(jnp.float32))
        logits_real, disc_state = apply_discriminator(self.discriminator, disc_params, disc_state, x)
        logits_fake, disc_state = apply_discriminator(self.discriminator, disc_params, disc_state, x_rec)
        factor = adopt_weight(self.disc_factor, step, self.disc_start)
        loss = factor * DISC_LOSSES[self.disc_loss](logits_real, logits_fake)
        metrics = dict(disc_loss=loss, logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
        return loss, (disc_state, jax.lax.stop_gradient(metrics))
