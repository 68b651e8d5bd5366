"""What a denoiser learns: pure loss functions of (model output, x0, noise, t), the
`DiffusionObjective` a config describes (prediction, schedule, loss), and the sampler it implies.

Every loss returns the batch mean (reduction="mean") or the per-sample values `[B]`
(reduction="none"); per-sample values are means over all non-batch dims (ADM's `mean_flat`).
The noisy input the model saw is implied: `x_t = schedule.add_noise(x0, noise, t)`.

* `diffusion_loss`: ε-, x0- or v-prediction MSE with optional min-SNR-γ weighting (Hang et al. 2023).
* `hybrid_loss`: ADM/DiT learned-variance loss: MSE on ε + vb_weight · VLB term (in bits) for the
  variance head, with the ε prediction stopped in the VLB. Formulated for float32 stability: the
  mean gap uses the exact identity `mu~ - mu_theta = c_t·(ε̂ - ε)` and the log-likelihood works in
  log-sigmoid form, so the result matches ADM's float64 formulas to ~1e-7.
* `flow_matching_loss`: rectified-flow velocity MSE against `noise - x0`.
* `DiffusionObjective` / `objective_from_config`: the `diffusion` section; the trainer draws its
  loss from it, the sampler its schedule and prediction (`sampler_from_config`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import samplers, schedules
from ldm_jax.diffusion.schedules import DiscreteSchedule, FlowSchedule, _bcast, _check_choice

PREDICTION_TYPES = ("epsilon", "v", "x0")
PREDICTIONS = PREDICTION_TYPES + ("flow",)  # what a DiffusionObjective learns
REDUCTIONS = ("mean", "none")


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: `[B, ...]` -> `[B]`."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _reduce(per_sample: jax.Array, reduction: str) -> jax.Array:
    _check_choice("reduction", reduction, REDUCTIONS)
    return jnp.mean(per_sample) if reduction == "mean" else per_sample


def prediction_target(prediction_type: str, x0: jax.Array, noise: jax.Array, alpha: jax.Array,
                      sigma: jax.Array) -> jax.Array:
    """What the model should output: noise ("epsilon"), x0 ("x0") or `alpha·noise - sigma·x0` ("v").

    alpha, sigma: `[B]` signal/noise scales of x_t.
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "x0":
        return x0
    return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0


def min_snr_weight(snr: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-γ loss weight `[B]`: min(SNR, γ) / SNR (ε), / (SNR + 1) (v), min(SNR, γ) (x0).

    These make each the same weighting of the x0 error; with SNR = 0 (zero terminal SNR) the ε weight
    takes its limit 1.
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma={gamma} must be > 0")
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
    if prediction_type == "v":
        return clipped / (snr + 1.0)
    return clipped


def diffusion_loss(
    prediction: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    schedule: DiscreteSchedule,
    *,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """MSE of an ε / x0 / v prediction. prediction, x0, noise: `[B, ...]`; t: `[B]` int timesteps."""
    alpha, sigma = schedule.alpha_sigma(t)
    target = prediction_target(prediction_type, x0, noise, alpha, sigma)
    per_sample = mean_flat((prediction.astype(jnp.float32) - target) ** 2)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight((alpha / sigma) ** 2, min_snr_gamma, prediction_type)
    return _reduce(per_sample, reduction)


def flow_matching_loss(velocity: jax.Array, x0: jax.Array, noise: jax.Array, *, reduction: str = "mean") -> jax.Array:
    """Rectified-flow velocity MSE: velocity `[B, ...]` against `noise - x0`."""
    return _reduce(mean_flat((velocity.astype(jnp.float32) - (noise - x0)) ** 2), reduction)


@functools.lru_cache(maxsize=8)
def _vlb_tables(schedule: DiscreteSchedule) -> dict[str, np.ndarray]:
    """Per-timestep float32 tables of the VLB term, computed in float64 (ADM's definitions).

    beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t) is the posterior variance, clipped at t = 0 to
    beta~_1 (ADM's posterior_log_variance_clipped); the model log-variance is
    frac·log beta + (1 - frac)·log beta~ with frac = (v + 1) / 2.
    """
    ab = schedule.alphas_cumprod_float64
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    betas = 1.0 - ab / ab_prev
    beta_tilde = betas * (1.0 - ab_prev) / (1.0 - ab)
    beta_tilde_clipped = np.concatenate([beta_tilde[1:2], beta_tilde[1:]]) if betas.size > 1 else betas
    x0_gap = np.sqrt(1.0 / ab - 1.0)  # x0 - x0_pred = x0_gap·(ε̂ - ε)
    mean_coef = betas * np.sqrt(ab_prev) / (1.0 - ab)  # posterior mean coefficient of x0
    tables = {
        "log_beta_tilde": np.log(beta_tilde_clipped),
        "log_ratio": np.log(betas) - np.log(beta_tilde_clipped),
        # (mu~ - mu_theta)² / beta~ = gap_over_var·(ε̂ - ε)²
        "gap_over_var": (mean_coef * x0_gap) ** 2 / beta_tilde_clipped,
        "x0_gap": x0_gap,
    }
    return {k: v.astype(np.float32) for k, v in tables.items()}


def _approx_std_normal_logcdf_arg(x: jax.Array) -> jax.Array:
    """ADM's approximate Φ(x) = 0.5(1 + tanh(√(2/π)(x + 0.044715x³))) = sigmoid(2·√(2/π)(x + 0.044715x³));
    returns the sigmoid's argument, so that log Φ = log_sigmoid(arg), log(1 - Φ) = log_sigmoid(-arg)."""
    return 2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)


def _discretized_gaussian_log_likelihood(x: jax.Array, centered: jax.Array, log_scale: jax.Array) -> jax.Array:
    """ADM's log-likelihood of data x under N(x - centered, exp(2·log_scale)) binned at 1/255.

    x: the data (decides the edge bins), centered: x - mean. Elementwise.
    """
    inv_std = jnp.exp(-log_scale)
    upper = _approx_std_normal_logcdf_arg(inv_std * (centered + 1.0 / 255.0))
    lower = _approx_std_normal_logcdf_arg(inv_std * (centered - 1.0 / 255.0))
    log_cdf_upper = jax.nn.log_sigmoid(upper)
    log_one_minus_cdf_lower = jax.nn.log_sigmoid(-lower)
    # sigmoid(a) - sigmoid(b) = sigmoid(a)·sigmoid(-b)·(1 - e^{b-a}): no cancellation near 0 or 1.
    log_delta = log_cdf_upper + log_one_minus_cdf_lower + jnp.log(-jnp.expm1(lower - upper))
    floor = math.log(1e-12)  # ADM clamps each probability at 1e-12
    return jnp.where(
        x < -0.999,
        jnp.maximum(log_cdf_upper, floor),
        jnp.where(x > 0.999, jnp.maximum(log_one_minus_cdf_lower, floor), jnp.maximum(log_delta, floor)),
    )


def hybrid_loss(
    model_output: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    schedule: DiscreteSchedule,
    *,
    vb_weight: float = 1.0,
    reduction: str = "mean",
) -> dict[str, jax.Array]:
    """ADM/DiT loss of a learned-range-variance ε model ("hybrid": MSE + vb_weight·VLB).

    Args:
      model_output: `[B, ..., 2C]`: ε̂ (first C channels) and the variance value v ∈ [-1, 1] (last C).
      x0, noise: `[B, ..., C]`; t: `[B]` int timesteps (of `schedule`).
      vb_weight: DiT (ADM LossType.MSE) uses 1; ADM's RESCALED_MSE (improved DDPM's λ = 0.001 on the
        full VLB sum) is `num_timesteps / 1000`.
    Returns {"loss", "mse", "vb"}: scalars, or `[B]` with reduction="none". vb is in bits per dim:
    KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, the discretized decoder NLL at t = 0; its
    gradient reaches only the variance half.
    """
    channels = x0.shape[-1]
    if model_output.shape[:-1] != x0.shape[:-1] or model_output.shape[-1] != 2 * channels:
        raise ValueError(f"model_output shape {model_output.shape} must be x0's {x0.shape} with 2·C channels")
    model_output = model_output.astype(jnp.float32)
    eps_pred, var_values = model_output[..., :channels], model_output[..., channels:]
    tables = {k: _bcast(jnp.asarray(v)[t], x0) for k, v in _vlb_tables(schedule).items()}

    mse = mean_flat((noise - eps_pred) ** 2)
    eps_gap = jax.lax.stop_gradient(eps_pred) - noise
    # log-variance of the model minus that of the true posterior
    log_var_gap = (var_values + 1.0) / 2.0 * tables["log_ratio"]
    kl = 0.5 * (jnp.expm1(-log_var_gap) + log_var_gap + tables["gap_over_var"] * eps_gap**2 * jnp.exp(-log_var_gap))
    decoder_nll = -_discretized_gaussian_log_likelihood(
        x0, tables["x0_gap"] * eps_gap, 0.5 * (tables["log_beta_tilde"] + log_var_gap)
    )
    vb = jnp.where(t == 0, mean_flat(decoder_nll), mean_flat(kl)) / math.log(2.0)
    loss = mse + vb_weight * vb
    return {name: _reduce(v, reduction) for name, v in (("loss", loss), ("mse", mse), ("vb", vb))}


# ----------------------------------------------------------------------------------------------
# The objective a denoiser is trained with, and the sampler that follows from it.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionObjective:
    """What a denoiser learns: the corruption of x0 and the loss on its output.

    prediction: "epsilon", "v" or "x0" on a `DiscreteSchedule` (learned sigma: ADM/DiT hybrid loss,
      epsilon only), or "flow" (velocity ε - x0) on a `FlowSchedule`.
    time_distribution, time_loc, time_std, time_shift: flow training times (uniform or logit-normal,
      then the resolution shift).
    """

    prediction: str
    schedule: DiscreteSchedule | FlowSchedule
    learn_sigma: bool = False
    min_snr_gamma: float | None = None
    vb_weight: float = 1.0
    time_distribution: str = "uniform"
    time_loc: float = 0.0
    time_std: float = 1.0
    time_shift: float = 1.0

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction={self.prediction!r}: allowed values are {PREDICTIONS}")
        flow = self.prediction == "flow"
        if flow != isinstance(self.schedule, FlowSchedule):
            raise ValueError(
                f"diffusion.prediction={self.prediction!r} needs a "
                f"{'flow' if flow else 'discrete (beta)'} schedule"
            )
        if self.learn_sigma and self.prediction in ("v", "x0"):
            raise ValueError(
                f"diffusion.prediction={self.prediction!r} with a learned sigma (model.learn_sigma): "
                "the hybrid loss is defined for 'epsilon' (or 'flow', which ignores the sigma half)"
            )

    def loss(self, denoise: Callable, x0: jax.Array, cond: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        """denoise(x_t, t, cond) -> output; x0: [B, h, w, C]. Returns (loss, {terms})."""
        time_key, noise_key = jax.random.split(key)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        channels = x0.shape[-1]
        if self.prediction == "flow":
            t = schedules.sample_flow_times(
                time_key, x0.shape[0], self.time_distribution, loc=self.time_loc, scale=self.time_std,
                shift=self.time_shift,
            )
            output = denoise(self.schedule.add_noise(x0, noise, t), t * self.schedule.time_scale, cond)
            loss = flow_matching_loss(output[..., :channels], x0, noise)
            return loss, {}
        t = jax.random.randint(time_key, (x0.shape[0],), 0, self.schedule.num_timesteps)
        model_t = jnp.asarray(self.schedule.model_timesteps)[t]
        output = denoise(self.schedule.add_noise(x0, noise, t), model_t, cond)
        if self.learn_sigma:
            terms = hybrid_loss(output, x0, noise, t, self.schedule, vb_weight=self.vb_weight)
            return terms["loss"], {"mse": terms["mse"], "vb": terms["vb"]}
        loss = diffusion_loss(
            output, x0, noise, t, self.schedule, prediction_type=self.prediction,
            min_snr_gamma=self.min_snr_gamma,
        )
        return loss, {}


def objective_from_config(config: Mapping[str, Any], learn_sigma: bool) -> DiffusionObjective:
    """The `diffusion` config section (every field: `ldm_jax/config.py`) -> DiffusionObjective."""
    if config["prediction"] == "flow":
        schedule = FlowSchedule(time_scale=config["flow_time_scale"])
    else:
        schedule = schedules.discrete_schedule(config["beta_schedule"], config["num_timesteps"],
                                               zero_terminal_snr=config["zero_terminal_snr"])
    return DiffusionObjective(
        prediction=config["prediction"], schedule=schedule, learn_sigma=learn_sigma,
        min_snr_gamma=config["min_snr_gamma"], vb_weight=config["vb_weight"],
        time_distribution=config["time_distribution"], time_loc=config["time_loc"], time_std=config["time_std"],
        time_shift=config["time_shift"],
    )


def sampler_from_config(config: Mapping[str, Any], objective: DiffusionObjective) -> samplers.SamplerConfig:
    """The `sample` section's sampler fields -> SamplerConfig; prediction and variance follow the
    trained objective (a learned sigma is used by DDPM as ADM/DiT do)."""
    names = {f.name for f in dataclasses.fields(samplers.SamplerConfig)} - {"prediction", "variance"}
    fields = {k: v for k, v in config.items() if k in names}
    prediction = "velocity" if objective.prediction == "flow" else objective.prediction
    variance = "learned_range" if objective.learn_sigma else "fixed_small"
    return samplers.SamplerConfig(prediction=prediction, variance=variance, **fields)
