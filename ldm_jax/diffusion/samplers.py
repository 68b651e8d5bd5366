"""Samplers: DDPM, DDIM, DPM-Solver++(2M), Euler, Heun and Euler–Maruyama, each one jitted loop.

A sampler walks a plain `denoise_fn(x: [B, ...], t: [B], cond) -> prediction` from noise to data;
it knows nothing of Flax. Usage:

    x0 = sample(denoise_fn, noise, labels, schedule=discrete_schedule("linear"),
                sampler="ddim", num_steps=50, guidance=Guidance(4.0, null_cond=1000))

How it runs: the time grid and every per-step coefficient are computed on the host in float64
(`make_plan`), then ONE jitted function (`lax.scan` over the steps) runs the loop. It is compiled
once per (input shapes, number of steps, static options, denoiser): pass the denoiser as a
`jax.tree_util.Partial(apply_fn, params)` so its parameters are traced inputs, not constants
(a fresh closure per call recompiles). Batch-sharded inputs stay sharded; `sample` may itself be
called inside an outer `jit`.

Conventions: `noise` is the state at the first grid point (samplers never rescale it). Every
discrete sampler follows the diffusers scheduler of the same name — spacing, rounding and update —
so that it reproduces a diffusers run exactly:
  * "ddpm"  — DDPMScheduler (ADM/DiT `p_sample` with "linspace" spacing; a `respace`d schedule gives
    DiT's "250"), except that no noise is added on the final step even when its timestep is > 0
    (diffusers adds it whenever t > 0, which matters only for fixed_large/learned_range with
    leading+offset or trailing spacing).
  * "ddim"  — DDIMScheduler, including its target step `t - T // N` (not the next grid point when N
    does not divide T, e.g. linspace spacing), with `set_alpha_to_one=True`.
  * "dpm_solver++" — DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    lower_order_final=True, final_sigmas_type="zero"): first-order first and last steps.
  * "euler" — EulerDiscreteScheduler (fractional "linspace" timesteps, sigma interpolated linearly)
    on a `DiscreteSchedule`, FlowMatchEulerDiscreteScheduler on a `FlowSchedule`. The discrete one
    keeps the variance-preserving state x; diffusers keeps `x · sqrt(1 + sigma²)` and hands the
    denoiser `scale_model_input(state)` = our x.
Flow samplers ("euler", "heun", "euler_maruyama", "dpm_solver++" on a `FlowSchedule`) use the grid of
`schedules.flow_timesteps`. "euler_maruyama" integrates SiT's SDE with diffusion w(t) = sde_norm·t
(SiT's "sigma" form, as REPA samples): `dx = [v + sde_norm·ε̂] dt + sqrt(2 w |dt|) z`, the last step
without noise.

Noise of the stochastic samplers: from one `key`, step s of the whole batch draws from
`split(key, num_steps)[s]` (the batch's draws depend on its size and order). From a batch of keys
`[B]`, sample b's step-s noise comes from `fold_in(key[b], s)`: each sample's trajectory depends on
its own key only, whatever batch, batch position or device layout it is generated in.

Inpainting (`sample(..., inpaint=Inpainting(known, mask))`, RePaint, Lugmayr et al. 2022): after
every step the known region (mask = 1) of the state is replaced by `known` noised to the state's
level, `alpha·known + sigma·z` with fresh noise z; the rest comes from the sampler's update. With
resampling (`jump_n_sample` > 1) the loop walks diffusers' `RePaintScheduler` grid with jumps
(`resampling_steps`): after certain steps it goes back `jump_length` levels by re-noising the state
with q(x_noisier | x) one grid level per entry, then denoises again. The expanded grid is computed on
the host; it is still one `lax.scan` (a `lax.cond` per entry: denoise or re-noise) in one jit.
Every entry draws one noise z (so inpainting needs `key`/`step_noise` even with a deterministic
sampler, e.g. DDIM eta = 0: its unknown region stays deterministic given the known region's draws);
a stochastic step uses the same z for its own noise and for the known region, as diffusers does —
harmless for a binary mask, where each element takes one of the two. The last step ends on the clean
level, so there the known region is `known` exactly. Diffusers' RePaint is "ddim" here (spacing
"leading", steps_offset 0, its eta, clip_x0=1 for clip_sample). One difference: with
T // num_steps = n > 1, diffusers' `undo_step` re-noises from t - n with betas[t, t + n) instead of
betas(t - n, t], landing at a slightly wrong level; we re-noise exactly to the next grid level
(identical for n = 1).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ldm_jax.diffusion.guidance import DenoiseFn, Guidance, classifier_free_guidance
from ldm_jax.diffusion.schedules import (
    SPACINGS,
    DiscreteSchedule,
    FlowSchedule,
    _check_choice,
    flow_timesteps,
    inference_timesteps,
)

SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "euler", "heun", "euler_maruyama")
DISCRETE_SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "euler")
FLOW_SAMPLERS = ("euler", "heun", "euler_maruyama", "dpm_solver++")
DISCRETE_PREDICTIONS = ("epsilon", "v", "x0")
FLOW_PREDICTIONS = ("velocity",)
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
INVERTIBLE_SAMPLERS = ("ddim", "euler")
# Single-step samplers: the state alone carries everything to the next step, so the loop can jump back.
INPAINT_SAMPLERS = ("ddpm", "ddim", "euler", "heun", "euler_maruyama")

# Diffusers scheduler whose timestep rounding each discrete sampler follows.
_SPACING_CONVENTION = {"ddpm": "ddpm", "ddim": "ddpm", "dpm_solver++": "dpm_solver", "euler": "euler"}
# diffusers' stand-in for ab = 0 (zero terminal SNR) in the samplers that work with log-SNR / VE sigma.
_MIN_ALPHAS_CUMPROD = 2.0**-24


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """What to sample with. Fields not used by the chosen sampler are ignored.

    sampler: one of SAMPLERS.
    num_steps: denoiser evaluations (Heun: steps, 2 evaluations each); <= training timesteps.
    prediction: what the denoiser returns: "epsilon", "v", "x0" (DiscreteSchedule) or "velocity"
      (FlowSchedule, `ε - x0`); None = "epsilon" resp. "velocity".
    spacing, steps_offset: discrete inference grid, as diffusers (`schedules.inference_timesteps`).
    eta: DDIM noise (0 = deterministic, 1 = DDPM-like).
    variance: DDPM's "fixed_small" (posterior beta~), "fixed_large" (beta) or "learned_range"
      (ADM/DiT: the denoiser returns 2C channels, the second half v ∈ [-1, 1] interpolating
      log beta~ .. log beta).
    clip_x0: clip the predicted x0 to [-clip_x0, clip_x0] (diffusers' clip_sample); None = no clip.
    shift, t_min: flow grid (`schedules.flow_timesteps`).
    sde_norm: Euler–Maruyama diffusion scale.
    """

    sampler: str = "ddim"
    num_steps: int = 50
    prediction: str | None = None
    spacing: str = "leading"
    steps_offset: int = 0
    eta: float = 0.0
    variance: str = "fixed_small"
    clip_x0: float | None = None
    shift: float = 1.0
    t_min: float | None = None
    sde_norm: float = 1.0

    def __post_init__(self):
        _check_choice("SamplerConfig.sampler", self.sampler, SAMPLERS)
        _check_choice("SamplerConfig.prediction", self.prediction, (None,) + DISCRETE_PREDICTIONS + FLOW_PREDICTIONS)
        _check_choice("SamplerConfig.spacing", self.spacing, SPACINGS)
        _check_choice("SamplerConfig.variance", self.variance, VARIANCES)
        if self.num_steps < 1:
            raise ValueError(f"SamplerConfig.num_steps={self.num_steps} must be >= 1")
        if self.eta < 0:
            raise ValueError(f"SamplerConfig.eta={self.eta} must be >= 0")
        if self.clip_x0 is not None and self.clip_x0 <= 0:
            raise ValueError(f"SamplerConfig.clip_x0={self.clip_x0} must be None or > 0")
        if self.sde_norm < 0:
            raise ValueError(f"SamplerConfig.sde_norm={self.sde_norm} must be >= 0")


@dataclasses.dataclass(frozen=True, eq=False)
class Inpainting:
    """Training-free inpainting (RePaint): what to keep and how much to resample.

    known: the clean image (latents) to inpaint, `[B, ..., C]` like the sampler's noise.
    mask: `[B, ..., C]` or `[B, ..., 1]`, values in [0, 1]: 1 = keep `known`, 0 = generate.
    jump_length: how many grid levels a resampling jump goes back (RePaint's j).
    jump_n_sample: how often each jump point is visited (RePaint's r; 1 = no resampling).
    """

    known: jax.Array
    mask: jax.Array
    jump_length: int = 10
    jump_n_sample: int = 10

    def __post_init__(self):
        if self.jump_length < 1:
            raise ValueError(f"Inpainting.jump_length={self.jump_length} must be >= 1")
        if self.jump_n_sample < 1:
            raise ValueError(f"Inpainting.jump_n_sample={self.jump_n_sample} must be >= 1")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the traced loop depends on besides array shapes (the jit cache key)."""

    sampler: str
    flow: bool
    prediction: str
    variance: str
    clip_x0: float | None
    stochastic: bool
    return_trajectory: bool
    inpaint: bool = False


# ----------------------------------------------------------------------------------------------
# Host side: the plan (grid + per-step coefficients, float64 -> float32).
# ----------------------------------------------------------------------------------------------


def _for_schedule(schedule, config: SamplerConfig) -> SamplerConfig:
    """Validates the (schedule, config) pair; returns the config with its prediction filled in."""
    if isinstance(schedule, FlowSchedule):
        kind, allowed_samplers, allowed_predictions = "FlowSchedule", FLOW_SAMPLERS, FLOW_PREDICTIONS
    elif isinstance(schedule, DiscreteSchedule):
        kind, allowed_samplers, allowed_predictions = "DiscreteSchedule", DISCRETE_SAMPLERS, DISCRETE_PREDICTIONS
    else:
        raise ValueError(f"schedule must be a DiscreteSchedule or FlowSchedule, got {type(schedule).__name__}")
    _check_choice(f"SamplerConfig.sampler ({kind})", config.sampler, allowed_samplers)
    if config.prediction is None:
        return dataclasses.replace(config, prediction=allowed_predictions[0])
    _check_choice(f"SamplerConfig.prediction ({kind})", config.prediction, allowed_predictions)
    return config


def _grid(schedule, config: SamplerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(model_t [N], alpha [N+1], sigma [N+1], index [N]) — the levels x = alpha·x0 + sigma·ε the
    sampler visits, the last one clean (alpha=1, sigma=0); index = schedule position (discrete)."""
    if isinstance(schedule, FlowSchedule):
        t = flow_timesteps(config.num_steps, shift=config.shift, t_min=config.t_min)
        return t[:-1] * schedule.time_scale, 1.0 - t, t, t[:-1]
    T = schedule.num_timesteps
    index = inference_timesteps(T, config.num_steps, config.spacing, config.steps_offset,
                                _SPACING_CONVENTION[config.sampler])
    ab = schedule.alphas_cumprod_float64
    positions = np.arange(T)
    model_t = np.interp(index, positions, schedule.model_timesteps.astype(np.float64))
    if config.sampler in ("euler", "dpm_solver++"):
        ab = np.where(ab == 0.0, _MIN_ALPHAS_CUMPROD, ab)
        sigma_ve = np.interp(index, positions, np.sqrt((1.0 - ab) / ab))  # diffusers' "sigmas"
        alpha = 1.0 / np.sqrt(1.0 + sigma_ve**2)
        sigma = sigma_ve * alpha
    else:
        alpha, sigma = np.sqrt(ab[index]), np.sqrt(1.0 - ab[index])
    return model_t, np.append(alpha, 1.0), np.append(sigma, 0.0), index


def _ddim_target(schedule: DiscreteSchedule, config: SamplerConfig, index: np.ndarray) -> np.ndarray:
    """ab of the level each DDIM step lands on: diffusers' t - T // N, clean (1) below 0 (float64)."""
    prev = index - schedule.num_timesteps // config.num_steps
    return np.where(prev >= 0, schedule.alphas_cumprod_float64[np.maximum(prev, 0)], 1.0)


def make_plan(schedule, config: SamplerConfig) -> dict[str, np.ndarray]:
    """Per-step float32 arrays `[num_steps]` driving the loop (host side, computed in float64)."""
    config = _for_schedule(schedule, config)
    model_t, alpha, sigma, index = _grid(schedule, config)
    n = len(model_t)
    a, s, a_next, s_next = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
    plan = {"model_t": model_t, "alpha": a, "sigma": s}
    last = np.arange(n) == n - 1
    name = config.sampler
    if name == "ddpm":
        ab, ab_next = a**2, a_next**2
        beta = 1.0 - ab / ab_next
        beta_tilde = np.maximum(beta * (1.0 - ab_next) / (1.0 - ab), 1e-20)
        if config.variance == "fixed_small":
            std = np.sqrt(beta_tilde)
        elif config.variance == "fixed_large":
            std = np.sqrt(beta)
        else:  # learned_range: per element in the loop, from log_beta and log_beta_tilde
            std = np.zeros(n)
        plan.update(
            x0_coef=np.sqrt(ab_next) * beta / (1.0 - ab),
            x_coef=np.sqrt(1.0 - beta) * (1.0 - ab_next) / (1.0 - ab),
            std=np.where(last, 0.0, std),
            log_beta=np.log(beta),
            log_beta_tilde=np.log(beta_tilde),
            noise_mask=np.where(last, 0.0, 1.0),
        )
    elif name == "ddim" or (name == "euler" and isinstance(schedule, DiscreteSchedule)):
        if name == "ddim":
            ab_next = _ddim_target(schedule, config, index)
            ab = a**2
            variance = (1.0 - ab_next) / (1.0 - ab) * (1.0 - ab / ab_next)
            std = config.eta * np.sqrt(variance)
            a_next, direction = np.sqrt(ab_next), np.sqrt(np.maximum(1.0 - ab_next - std**2, 0.0))
        else:
            std, direction = np.zeros(n), s_next
        plan.update(alpha_next=a_next, direction=direction, std=std)
    elif name == "dpm_solver++":
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at the clean end, -inf at flow t = 1
            h = lam[1:] - lam[:-1]
            x0_coef = -a_next * np.expm1(-h)
            ratio = np.concatenate([[0.0], h[1:] / h[:-1]])  # 1 / r0 of diffusers' D1
        second_order = (np.arange(n) > 0) & ~last
        plan.update(
            x_coef=s_next / s,
            x0_coef=x0_coef,
            diff_coef=np.where(second_order, 0.5 * x0_coef * np.nan_to_num(ratio, posinf=0.0), 0.0),
        )
    else:  # flow euler, heun, euler_maruyama
        plan.update(dt=s_next - s, alpha_next=a_next, sigma_next=s_next,
                    model_t_next=np.append(model_t[1:], 0.0))
        if name == "euler_maruyama":
            plan.update(noise_std=np.where(last, 0.0, np.sqrt(2.0 * config.sde_norm * s * np.abs(s_next - s))),
                        sde_norm=np.full(n, config.sde_norm))
    return {k: np.asarray(v, np.float32) for k, v in plan.items()}


def resampling_steps(num_steps: int, jump_length: int, jump_n_sample: int) -> tuple[np.ndarray, np.ndarray]:
    """RePaint's grid with jumps (diffusers' `RePaintScheduler.set_timesteps`) as loop entries.

    Returns (step [M] int, forward [M] bool). Entry e runs base step `step[e]` (0 = the noisiest)
    unless `forward[e]`; a forward entry re-noises the state one grid level up, to the input level
    of step `step[e] + 1`. Jumps of `jump_length` levels follow base steps num_steps - 1 (the last),
    num_steps - 1 - jump_length, ... (diffusers' timesteps 0, j, 2j, ... < num_steps - j), each
    `jump_n_sample - 1` times.
    """
    jumps = {level: jump_n_sample - 1 for level in range(0, num_steps - jump_length, jump_length)}
    levels, level = [], num_steps  # diffusers' unscaled timesteps: num_steps - 1 .. 0
    while level >= 1:
        level -= 1
        levels.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            for _ in range(jump_length):
                level += 1
                levels.append(level)
    levels = np.asarray(levels)
    return num_steps - 1 - levels, np.concatenate([[False], levels[1:] > levels[:-1]])


def _inpainting_plan(schedule, config: SamplerConfig, inpaint: Inpainting) -> dict[str, np.ndarray]:
    """The per-entry plan `[M]` of an inpainting loop: the base plan of each entry's step, plus
    `forward` (bool), the re-noising `x <- renoise_a·x + renoise_s·z` of forward entries and the level
    `known_alpha·known + known_sigma·z` the known region is put at after a step (host, float64)."""
    config = _for_schedule(schedule, config)
    _check_choice("SamplerConfig.sampler (inpainting)", config.sampler, INPAINT_SAMPLERS)
    if inpaint.jump_n_sample > 1 and inpaint.jump_length >= config.num_steps:
        raise ValueError(f"Inpainting.jump_length={inpaint.jump_length} must be < num_steps={config.num_steps} "
                         f"to resample (jump_n_sample={inpaint.jump_n_sample})")
    _, alpha, sigma, index = _grid(schedule, config)
    alpha_in, sigma_in = alpha[:-1], sigma[:-1]  # the level each step starts from
    if config.sampler == "ddim":  # ... and the level it lands on
        ab_next = _ddim_target(schedule, config, index)
        alpha_out, sigma_out = np.sqrt(ab_next), np.sqrt(1.0 - ab_next)
    else:
        alpha_out, sigma_out = alpha[1:], sigma[1:]
    steps, forward = resampling_steps(config.num_steps, inpaint.jump_length, inpaint.jump_n_sample)
    renoise_a, renoise_s = np.ones(len(steps)), np.zeros(len(steps))
    level = None  # (alpha, sigma) of the state before the entry
    for e, (step, fwd) in enumerate(zip(steps, forward)):
        if fwd:  # q(x_to | x_from) = N((a_to/a_from)·x_from, s_to² - (a_to/a_from)²·s_from²)
            to = alpha_in[step + 1], sigma_in[step + 1]
            renoise_a[e] = to[0] / level[0]
            renoise_s[e] = np.sqrt(max(to[1] ** 2 - renoise_a[e] ** 2 * level[1] ** 2, 0.0))
            level = to
        else:
            level = alpha_out[step], sigma_out[step]
    plan = {k: v[steps] for k, v in make_plan(schedule, config).items()}
    plan.update({k: np.asarray(v, np.float32) for k, v in (
        ("renoise_a", renoise_a), ("renoise_s", renoise_s),
        ("known_alpha", alpha_out[steps]), ("known_sigma", sigma_out[steps]))})
    plan["forward"] = forward
    return plan


def _is_stochastic(config: SamplerConfig) -> bool:
    return (config.sampler in ("ddpm", "euler_maruyama")) or (config.sampler == "ddim" and config.eta > 0)


# ----------------------------------------------------------------------------------------------
# Device side: the loop.
# ----------------------------------------------------------------------------------------------


def _x0_eps(pred, x, alpha, sigma, prediction: str, clip_x0: float | None):
    """Denoiser output -> (x0, ε) at the level x = alpha·x0 + sigma·ε (x0 clipped, ε not, as diffusers)."""
    if prediction == "epsilon":
        x0, eps = (x - sigma * pred) / alpha, pred
    elif prediction == "v":
        x0, eps = alpha * x - sigma * pred, alpha * pred + sigma * x
    elif prediction == "x0":
        x0, eps = pred, (x - alpha * pred) / sigma
    else:  # flow velocity ε - x0 with alpha + sigma = 1
        x0, eps = x - sigma * pred, x + alpha * pred
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
    return x0, eps


def _run(denoise_fn, noise, cond, plan, key, step_noise, static: _Static, inpaint=None):
    """inpaint: (known [B, ..., C], mask [B, ..., C or 1]) when static.inpaint."""
    noise = noise.astype(jnp.promote_types(noise.dtype, jnp.float32))  # the state stays >= float32
    batch = noise.shape[0]
    channels = noise.shape[-1]

    def model(x, t):
        """-> (prediction [B, ..., C], variance values [B, ..., C] or None)."""
        out = denoise_fn(x, jnp.full((batch,), t, jnp.float32), cond).astype(x.dtype)
        if out.shape[:-1] != x.shape[:-1] or out.shape[-1] not in (channels, 2 * channels):
            raise ValueError(f"denoise_fn returned shape {out.shape} for x of shape {x.shape}; expected "
                             f"{x.shape[-1]} channels, or {2 * channels} for a learned-variance denoiser")
        if out.shape[-1] == 2 * channels:
            return out[..., :channels], out[..., channels:]
        if static.sampler == "ddpm" and static.variance == "learned_range":
            raise ValueError("SamplerConfig.variance='learned_range' needs a denoiser returning 2·C channels")
        return out, None

    def x0_eps(x, t, alpha, sigma):
        pred, var = model(x, t)
        x0, eps = _x0_eps(pred, x, alpha, sigma, static.prediction, static.clip_x0)
        return x0, eps, pred, var

    def velocity(x, t, alpha, sigma):
        """Flow velocity (with clipping folded in) and ε̂."""
        x0, eps, pred, _ = x0_eps(x, t, alpha, sigma)
        return (pred if static.clip_x0 is None else eps - x0), eps

    def draw(z):
        """z: this step's noise, its PRNG key or index, or a placeholder (deterministic) -> noise."""
        if static.stochastic and step_noise is None:
            if per_sample_keys:  # z = the step index s; sample b draws from fold_in(key[b], s)
                draw_one = lambda k: jax.random.normal(jax.random.fold_in(k, z), noise.shape[1:], noise.dtype)  # noqa: E731
                return jax.vmap(draw_one)(key)
            return jax.random.normal(z, noise.shape, noise.dtype)
        return z

    def update(carry, p, z):
        """One sampler step with plan entry p and noise z."""
        x = carry["x"]
        if static.sampler == "ddpm":
            x0, _, _, var = x0_eps(x, p["model_t"], p["alpha"], p["sigma"])
            std = p["std"]
            if static.variance == "learned_range":
                frac = (var + 1.0) / 2.0
                std = p["noise_mask"] * jnp.exp(0.5 * (frac * p["log_beta"] + (1.0 - frac) * p["log_beta_tilde"]))
            x = p["x0_coef"] * x0 + p["x_coef"] * x + std * z
        elif static.sampler == "ddim" or (static.sampler == "euler" and not static.flow):
            x0, eps, _, _ = x0_eps(x, p["model_t"], p["alpha"], p["sigma"])
            x = p["alpha_next"] * x0 + p["direction"] * eps
            if static.stochastic:
                x = x + p["std"] * z
        elif static.sampler == "dpm_solver++":
            x0, _, _, _ = x0_eps(x, p["model_t"], p["alpha"], p["sigma"])
            x = p["x_coef"] * x + p["x0_coef"] * x0 + p["diff_coef"] * (x0 - carry["x0_prev"])
            carry = {**carry, "x0_prev": x0}
        elif static.sampler == "euler":  # flow
            v, _ = velocity(x, p["model_t"], p["alpha"], p["sigma"])
            x = x + p["dt"] * v
        elif static.sampler == "heun":
            v, _ = velocity(x, p["model_t"], p["alpha"], p["sigma"])
            x_euler = x + p["dt"] * v
            v_next, _ = velocity(x_euler, p["model_t_next"], p["alpha_next"], p["sigma_next"])
            x = x + p["dt"] * 0.5 * (v + v_next)
        else:  # euler_maruyama
            v, eps = velocity(x, p["model_t"], p["alpha"], p["sigma"])
            x = x + p["dt"] * (v + p["sde_norm"] * eps) + p["noise_std"] * z
        return {**carry, "x": x}

    def step(carry, xs):
        p, z = xs
        carry = update(carry, p, draw(z))
        return carry, (carry["x"] if static.return_trajectory else None)

    def inpaint_step(carry, xs):
        p, z = xs
        z = draw(z)
        known, mask = (v.astype(noise.dtype) for v in inpaint)

        def denoise(carry):
            carry = update(carry, p, z)
            known_t = p["known_alpha"] * known + p["known_sigma"] * z
            return {**carry, "x": mask * known_t + (1.0 - mask) * carry["x"]}

        def renoise(carry):
            return {**carry, "x": p["renoise_a"] * carry["x"] + p["renoise_s"] * z}

        carry = jax.lax.cond(p["forward"], renoise, denoise, carry)
        return carry, (carry["x"] if static.return_trajectory else None)

    n = plan["model_t"].shape[0]
    per_sample_keys = key is not None and _is_key_batch(key)
    if not static.stochastic:
        per_step = jnp.zeros((n,))
    elif step_noise is None:  # noise drawn inside the step: [N, B, ...] never exists
        per_step = jnp.arange(n, dtype=jnp.uint32) if per_sample_keys else jax.random.split(key, n)
    else:
        per_step = step_noise
    carry = {"x": noise}
    if static.sampler == "dpm_solver++":
        carry["x0_prev"] = jnp.zeros_like(noise)
    carry, trajectory = jax.lax.scan(inpaint_step if static.inpaint else step, carry, (plan, per_step))
    return (carry["x"], trajectory) if static.return_trajectory else carry["x"]


_run_jit = jax.jit(_run, static_argnames=("static",))


def _is_key_batch(key: jax.Array) -> bool:
    """Whether `key` is a batch of keys `[B]` (typed, or raw `uint32[B, 2]`) rather than one key."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim == (1 if typed else 2)


def compiled_loop_count() -> int:
    """How many sampling loops have been compiled in this process (jit cache entries)."""
    return _run_jit._cache_size()


def _resolve_config(config: SamplerConfig | None, fields: dict) -> SamplerConfig:
    if config is not None and fields:
        raise ValueError(f"pass either config= or config fields, not both (got {sorted(fields)})")
    return config if config is not None else SamplerConfig(**fields)


def _as_pytree_fn(denoise_fn: DenoiseFn) -> Partial:
    return denoise_fn if isinstance(denoise_fn, Partial) else Partial(denoise_fn)


def sample(
    denoise_fn: DenoiseFn,
    noise: jax.Array,
    cond: Any = None,
    *,
    schedule: DiscreteSchedule | FlowSchedule,
    config: SamplerConfig | None = None,
    key: jax.Array | None = None,
    guidance: Guidance | None = None,
    step_noise: jax.Array | None = None,
    return_trajectory: bool = False,
    inpaint: Inpainting | None = None,
    **config_fields,
):
    """Runs a sampler from `noise` to data.

    Args:
      denoise_fn: `(x [B, ...], t [B] float32, cond) -> prediction [B, ..., C]` ([B, ..., 2C] with a
        learned variance); best a `jax.tree_util.Partial` (see module docstring).
      noise: the initial state `[B, ..., C]` (e.g. latents `[B, h, w, C]`), may be sharded on B.
      cond: the condition pytree passed through to `denoise_fn` (e.g. labels `[B]`).
      schedule: a `DiscreteSchedule` or `FlowSchedule`.
      config: a `SamplerConfig`, or give its fields as keyword arguments (sampler="ddim", ...).
      key: PRNG key for the stochastic samplers (ddpm, ddim with eta > 0, euler_maruyama): one key,
        or one per sample, `[B]` (see the module docstring), which may be sharded like `noise`.
      guidance: classifier-free guidance settings (see `guidance.Guidance`).
      step_noise: `[num_steps, *noise.shape]` explicit per-step noise instead of `key` (reproducing
        another implementation's draws); steps that add no noise ignore theirs. With `inpaint`, one
        per loop entry: `[len(resampling_steps(...)[0]), *noise.shape]`.
      return_trajectory: also return the state after every step (loop entry with `inpaint`),
        `[num_steps, *noise.shape]`.
      inpaint: inpaint `Inpainting.known` where its mask is 1 (see the module docstring); needs
        `key` or `step_noise` whatever the sampler. One of INPAINT_SAMPLERS.
    Returns the final sample `[B, ..., C]` (and the trajectory).
    """
    config = _for_schedule(schedule, _resolve_config(config, config_fields))
    plan = make_plan(schedule, config) if inpaint is None else _inpainting_plan(schedule, config, inpaint)
    stochastic = _is_stochastic(config) or inpaint is not None
    if stochastic and key is None and step_noise is None:
        what = f"sampler={config.sampler!r}" if inpaint is None else "inpainting"
        raise ValueError(f"{what} is stochastic here: pass key= or step_noise=")
    if key is not None and _is_key_batch(key) and key.shape[0] != noise.shape[0]:
        raise ValueError(f"key holds {key.shape[0]} per-sample keys for a batch of {noise.shape[0]}")
    if step_noise is not None and step_noise.shape != (len(plan["model_t"]),) + noise.shape:
        raise ValueError(f"step_noise has shape {step_noise.shape}; expected "
                         f"{(len(plan['model_t']),) + tuple(noise.shape)}")
    if guidance is not None:
        denoise_fn = classifier_free_guidance(denoise_fn, guidance, schedule.time_scale)
    static = _Static(config.sampler, isinstance(schedule, FlowSchedule), config.prediction, config.variance,
                     config.clip_x0, stochastic, return_trajectory, inpaint is not None)
    return _run_jit(_as_pytree_fn(denoise_fn), noise, cond, plan, key if step_noise is None else None,
                    step_noise if stochastic else None, static=static,
                    inpaint=None if inpaint is None else _checked_inpainting(inpaint, noise))


def _checked_inpainting(inpaint: Inpainting, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(known, mask) after checking them against the noise `[B, ..., C]`."""
    known, mask = jnp.asarray(inpaint.known), jnp.asarray(inpaint.mask)
    if known.shape != noise.shape:
        raise ValueError(f"Inpainting.known has shape {known.shape}; expected the noise's shape {noise.shape}")
    channel_mask = noise.shape[:-1] + (1,)
    if mask.shape not in (noise.shape, channel_mask):
        raise ValueError(f"Inpainting.mask has shape {mask.shape}, which does not match the noise's shape "
                         f"{noise.shape}; expected {noise.shape} or {channel_mask}")
    if not isinstance(mask, jax.core.Tracer):  # values are checked where they are known
        lo, hi = float(jnp.min(mask)), float(jnp.max(mask))
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"Inpainting.mask values must lie in [0, 1] (1 = keep `known`); got min {lo}, max {hi}")
    return known, mask


def invert(
    denoise_fn: DenoiseFn,
    x0: jax.Array,
    cond: Any = None,
    *,
    schedule: DiscreteSchedule | FlowSchedule,
    config: SamplerConfig | None = None,
    guidance: Guidance | None = None,
    return_trajectory: bool = False,
    **config_fields,
):
    """Deterministic inversion (data -> noise) along the grid `sample` would walk back.

    Only "ddim" (eta = 0; the grid's next point is used, not diffusers' t - T//N) and "euler".
    Each step goes one grid point noisier and evaluates the denoiser at the TARGET point's time with
    the current state (as diffusers' DDIMInverseScheduler). `sample` with the same config maps the
    result back to ≈ x0.
    """
    config = _for_schedule(schedule, _resolve_config(config, config_fields))
    _check_choice("SamplerConfig.sampler (invert)", config.sampler, INVERTIBLE_SAMPLERS)
    if config.eta != 0:
        raise ValueError(f"SamplerConfig.eta={config.eta}: inversion is deterministic, use eta=0")
    if config.prediction == "x0":
        raise ValueError("SamplerConfig.prediction='x0' cannot be inverted from the clean end (sigma = 0)")
    flow = isinstance(schedule, FlowSchedule)
    model_t, alpha, sigma, _ = _grid(schedule, dataclasses.replace(config, sampler="euler") if flow else config)
    rev = lambda v: np.asarray(v[::-1], np.float32)  # noqa: E731
    plan = {"model_t": rev(model_t), "alpha": rev(alpha[1:]), "sigma": rev(sigma[1:])}
    if flow:
        plan.update(dt=rev(sigma[:-1] - sigma[1:]))
    else:
        plan.update(alpha_next=rev(alpha[:-1]), direction=rev(sigma[:-1]), std=np.zeros(len(model_t), np.float32))
    if guidance is not None:
        denoise_fn = classifier_free_guidance(denoise_fn, guidance, schedule.time_scale)
    static = _Static("euler", flow, config.prediction, config.variance, config.clip_x0, False, return_trajectory)
    return _run_jit(_as_pytree_fn(denoise_fn), x0, cond, plan, None, None, static=static)
