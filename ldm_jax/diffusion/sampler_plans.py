"""What a sampler does at each step, computed on the host in float64 before the loop runs: the
time grid and every per-step coefficient (`make_plan`), and RePaint's grid with jumps.

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
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

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


def for_schedule(schedule, config: SamplerConfig) -> SamplerConfig:
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


def grid(schedule, config: SamplerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    config = for_schedule(schedule, config)
    model_t, alpha, sigma, index = grid(schedule, config)
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


def inpainting_plan(schedule, config: SamplerConfig, inpaint: Inpainting) -> dict[str, np.ndarray]:
    """The per-entry plan `[M]` of an inpainting loop: the base plan of each entry's step, plus
    `forward` (bool), the re-noising `x <- renoise_a·x + renoise_s·z` of forward entries and the level
    `known_alpha·known + known_sigma·z` the known region is put at after a step (host, float64)."""
    config = for_schedule(schedule, config)
    _check_choice("SamplerConfig.sampler (inpainting)", config.sampler, INPAINT_SAMPLERS)
    if inpaint.jump_n_sample > 1 and inpaint.jump_length >= config.num_steps:
        raise ValueError(f"Inpainting.jump_length={inpaint.jump_length} must be < num_steps={config.num_steps} "
                         f"to resample (jump_n_sample={inpaint.jump_n_sample})")
    _, alpha, sigma, index = grid(schedule, config)
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

