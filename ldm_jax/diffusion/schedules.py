"""Noise schedules: the forward (noising) processes and the time grids samplers walk.

Two families:

* `DiscreteSchedule` — discrete-time Gaussian (VP) diffusion, `x_t = sqrt(ab_t)·x0 + sqrt(1-ab_t)·ε`
  for integer `t ∈ [0, T)`, `ab_t = prod_{s<=t} (1 - beta_s)` (DDPM/ADM/DiT, Stable Diffusion).
  Every table is computed in float64 and stored float32.
* `FlowSchedule` — rectified flow / flow matching, `x_t = (1-t)·x0 + t·ε` for `t ∈ [0, 1]`
  (t = 1 is pure noise), velocity target `ε - x0` (SD3, SiT, LightningDiT).

Schedules are plain frozen dataclasses of host (numpy) arrays: static configuration, built once outside
`jit` and closed over by jitted code; they hold no state.

Inference time grids follow diffusers' names (`leading`, `trailing`, `linspace`, `steps_offset`) and
each diffusers scheduler's own rounding, so a sampler can be configured to reproduce a diffusers run
exactly; `space_timesteps` + `respace` reproduce ADM/DiT's `SpacedDiffusion` ("250", "ddim50").
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
# Which diffusers scheduler's rounding a discrete grid follows (see `inference_timesteps`).
SPACING_CONVENTIONS = ("ddpm", "dpm_solver", "euler")
FLOW_TIME_DISTRIBUTIONS = ("uniform", "logit_normal")

# Default (beta_start, beta_end): DDPM/ADM/DiT and Stable Diffusion.
_DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def _check_choice(field: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")


# ----------------------------------------------------------------------------------------------
# Discrete-time Gaussian diffusion.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """A discrete VP diffusion: per-timestep tables, each `[T]` float32 (computed in float64).

    Attributes:
      betas: `beta_t`.
      alphas_cumprod: `ab_t = prod_{s<=t}(1 - beta_s)`.
      sqrt_alphas_cumprod: signal scale `alpha_t = sqrt(ab_t)`.
      sqrt_one_minus_alphas_cumprod: noise scale `sigma_t = sqrt(1 - ab_t)`.
      model_timesteps: the time the denoiser is given at each index: `arange(T)` for a full schedule,
        the kept original timesteps for a `respace`d one (ADM's `timestep_map`).
      time_scale: the denoiser's time of pure noise (the original number of training timesteps);
        guidance intervals are fractions `t / time_scale`.
      alphas_cumprod_float64: the float64 `ab_t` the tables come from, kept on the host for the
        host-side tables of samplers and losses (1 - ab and 1 - beta lose digits in float32).
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    model_timesteps: np.ndarray
    time_scale: float
    alphas_cumprod_float64: np.ndarray = dataclasses.field(repr=False)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Signal and noise scales at integer timesteps `t: [B]` -> (`[B]`, `[B]`) float32."""
        return (jnp.asarray(self.sqrt_alphas_cumprod)[t], jnp.asarray(self.sqrt_one_minus_alphas_cumprod)[t])

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """`x_t = alpha_t·x0 + sigma_t·noise`; x0, noise: `[B, ...]`, t: `[B]` int."""
        alpha, sigma = self.alpha_sigma(t)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise

    def snr(self, t: jax.Array) -> jax.Array:
        """Signal-to-noise ratio `ab_t / (1 - ab_t)` at integer timesteps `t: [B]` -> `[B]`."""
        alpha, sigma = self.alpha_sigma(t)
        return (alpha / sigma) ** 2


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Per-sample `[B]` -> `[B, 1, ..., 1]` broadcastable against `x: [B, ...]`."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def schedule_from_betas(
    betas: np.ndarray, *, model_timesteps: np.ndarray | None = None, time_scale: float | None = None
) -> DiscreteSchedule:
    """Builds a `DiscreteSchedule` from betas `[T]` (any float dtype; tables computed in float64)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError("betas must lie in (0, 1]")
    ab = np.cumprod(1.0 - betas)
    if model_timesteps is None:
        model_timesteps = np.arange(betas.size)
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return DiscreteSchedule(
        betas=f32(betas),
        alphas_cumprod=f32(ab),
        sqrt_alphas_cumprod=f32(np.sqrt(ab)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ab)),
        model_timesteps=f32(model_timesteps),
        time_scale=float(betas.size if time_scale is None else time_scale),
        alphas_cumprod_float64=ab,
    )


def discrete_schedule(
    beta_schedule: str = "linear",
    num_timesteps: int = 1000,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    zero_terminal_snr: bool = False,
) -> DiscreteSchedule:
    """A named beta schedule.

    Args:
      beta_schedule: "linear" (DDPM/ADM/DiT: betas linear in [1e-4, 0.02]), "scaled_linear" (Stable Diffusion:
        sqrt(beta) linear in [sqrt(0.00085), sqrt(0.012)]) or "cosine" (improved DDPM / diffusers
        "squaredcos_cap_v2": ab(t) = cos²((t + 0.008)/1.008 · π/2), betas capped at 0.999).
      num_timesteps: T. (ADM scales the linear range by 1000/T; pass beta_start/beta_end for that.)
      beta_start, beta_end: override the linear/scaled_linear range.
      zero_terminal_snr: rescale so that ab_{T-1} = 0 (Lin et al. 2023, Algorithm 1).
    """
    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps={num_timesteps} must be >= 1")
    if beta_schedule == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("beta_start/beta_end do not apply to beta_schedule='cosine'")
        alpha_bar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        i = np.arange(num_timesteps, dtype=np.float64)
        ratio = np.array([alpha_bar(u) for u in (i + 1) / num_timesteps]) / np.array(
            [alpha_bar(u) for u in i / num_timesteps]
        )
        betas = np.minimum(1.0 - ratio, 0.999)
    else:
        start, end = _DEFAULT_BETA_RANGE[beta_schedule]
        start = start if beta_start is None else beta_start
        end = end if beta_end is None else beta_end
        if beta_schedule == "linear":
            betas = np.linspace(start, end, num_timesteps, dtype=np.float64)
        else:
            betas = np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return schedule_from_betas(betas)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(ab) so that its last value is 0 and its first is unchanged (float64)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """ADM's timestep respacing: which original timesteps to keep (sorted).

    `section_counts` is "ddimN" (every T/N-th step, as DDIM), a comma-separated string or a list of
    counts: the T steps are cut into equal sections, each strided evenly to its count with rounded
    fractional strides (DiT samples with "250").
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"section_counts={section_counts!r}: no integer stride gives {desired} steps "
                             f"out of {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"section_counts: cannot take {count} steps from a section of {size} timesteps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated like ADM, so rounding ties fall the same way
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def respace(schedule: DiscreteSchedule, use_timesteps: Sequence[int]) -> DiscreteSchedule:
    """The diffusion restricted to `use_timesteps`, with betas re-derived (ADM's `SpacedDiffusion`).

    New beta_i = 1 - ab[t_i] / ab[t_{i-1}]; the denoiser keeps receiving the original timesteps t_i.
    """
    use = np.asarray(sorted(set(int(t) for t in use_timesteps)))
    if use.size == 0 or use[0] < 0 or use[-1] >= schedule.num_timesteps:
        raise ValueError(f"use_timesteps must be non-empty and within [0, {schedule.num_timesteps})")
    ab = schedule.alphas_cumprod_float64[use]
    betas = 1.0 - ab / np.concatenate([[1.0], ab[:-1]])
    return schedule_from_betas(
        betas, model_timesteps=schedule.model_timesteps[use], time_scale=schedule.time_scale
    )


def inference_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    convention: str = "ddpm",
) -> np.ndarray:
    """Descending schedule indices for `num_steps` inference steps, exactly as diffusers makes them.

    convention: whose rounding to follow —
      "ddpm": DDPMScheduler / DDIMScheduler (int64): linspace = round(linspace(0, T-1, N));
        leading = arange(N)·(T//N) + steps_offset; trailing = round(arange(T, 0, -T/N)) - 1.
      "dpm_solver": DPMSolverMultistepScheduler: linspace and leading take N+1 points and drop the
        last (t = 0); trailing as above.
      "euler": EulerDiscreteScheduler (float64, fractional): linspace is NOT rounded.
    Returns `[num_steps]`.
    """
    _check_choice("spacing", spacing, SPACINGS)
    _check_choice("convention", convention, SPACING_CONVENTIONS)
    T, N = num_train_timesteps, num_steps
    if not 1 <= N <= T:
        raise ValueError(f"num_steps={N} must be in [1, {T}] (the schedule's training timesteps)")
    extra = 1 if convention == "dpm_solver" else 0
    if spacing == "linspace":
        grid = np.linspace(0, T - 1, N + extra)
        timesteps = grid[::-1] if convention == "euler" else grid.round()[::-1]
        timesteps = timesteps[:N]
    elif spacing == "leading":
        timesteps = (np.arange(N + extra) * (T // (N + extra))).round()[::-1][:N] + steps_offset
    else:
        timesteps = np.round(np.arange(T, 0, -T / N)) - 1
    if timesteps.max() > T - 1:
        raise ValueError(f"steps_offset={steps_offset} pushes timestep {int(timesteps.max())} past T-1={T - 1}")
    if convention == "euler":
        return timesteps.astype(np.float32).astype(np.float64)
    return timesteps.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Continuous flow matching / rectified flow.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow `x_t = (1 - t)·x0 + t·ε`, t ∈ [0, 1] (t = 1 noise), velocity `ε - x0`.

    Attributes:
      time_scale: the denoiser is given `t · time_scale` (1 for SiT-style models, 1000 for diffusers /
        SD3-style ones); guidance intervals are fractions of it.
    """

    time_scale: float = 1.0

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """x0, noise: `[B, ...]`, t: `[B]` in [0, 1] -> x_t `[B, ...]`."""
        t = _bcast(t.astype(x0.dtype), x0)
        return (1.0 - t) * x0 + t * noise

    @staticmethod
    def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
        """The flow-matching regression target `d x_t / d t = noise - x0`."""
        return noise - x0


def time_shift(t, shift: float):
    """Resolution time shift `shift·t / (1 + (shift - 1)·t)` (SD3; = Flux's exponential shift with
    shift = exp(mu)). Works on numpy and jax arrays; shift > 1 moves time towards noise."""
    if shift <= 0:
        raise ValueError(f"shift={shift} must be > 0")
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(num_tokens: int, base_num_tokens: int = 256) -> float:
    """SD3's shift for a resolution: sqrt(m / n), m and n the token (latent pixel) counts of the
    target and the base resolution."""
    if num_tokens < 1 or base_num_tokens < 1:
        raise ValueError("num_tokens and base_num_tokens must be >= 1")
    return math.sqrt(num_tokens / base_num_tokens)


def sample_flow_times(
    key: jax.Array,
    batch_size: int,
    distribution: str = "uniform",
    *,
    loc: float = 0.0,
    scale: float = 1.0,
    shift: float = 1.0,
) -> jax.Array:
    """Training times t ∈ (0, 1): `[batch_size]` float32.

    distribution: "uniform" or "logit_normal" (SD3: t = sigmoid(N(loc, scale²))); then `time_shift`
    by `shift` (1 = none).
    """
    _check_choice("distribution", distribution, FLOW_TIME_DISTRIBUTIONS)
    if distribution == "uniform":
        t = jax.random.uniform(key, (batch_size,), jnp.float32)
    else:
        t = jax.nn.sigmoid(loc + scale * jax.random.normal(key, (batch_size,), jnp.float32))
    return t if shift == 1.0 else time_shift(t, shift)


def flow_timesteps(num_steps: int, *, shift: float = 1.0, t_min: float | None = None) -> np.ndarray:
    """The flow sampling grid `[num_steps + 1]`, from t = 1 down to exactly 0 (float64).

    The first num_steps points are linspace(1, t_min, num_steps), then time-shifted by `shift`, then 0
    is appended. t_min=None gives the uniform grid linspace(1, 0, num_steps + 1) (SiT/REPA ODE);
    REPA's SDE uses t_min=0.04; diffusers' FlowMatchEulerDiscreteScheduler(shift=s) is
    t_min = time_shift(1 / num_train_timesteps, s).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if t_min is None:
        t_min = 1.0 / num_steps
    if not 0.0 < t_min <= 1.0:
        raise ValueError(f"t_min={t_min} must be in (0, 1]")
    t = time_shift(np.linspace(1.0, t_min, num_steps, dtype=np.float64), shift)
    return np.concatenate([t, [0.0]])
