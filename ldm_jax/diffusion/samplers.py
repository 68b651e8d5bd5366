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

The time grids and their diffusers conventions: `sampler_plans.py`.

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
from ldm_jax.diffusion.sampler_plans import (
    INVERTIBLE_SAMPLERS,
    Inpainting,
    SamplerConfig,
    for_schedule,
    grid,
    inpainting_plan,
    make_plan,
)
from ldm_jax.diffusion.schedules import DiscreteSchedule, FlowSchedule, _check_choice


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
    config = for_schedule(schedule, _resolve_config(config, config_fields))
    plan = make_plan(schedule, config) if inpaint is None else inpainting_plan(schedule, config, inpaint)
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
    config = for_schedule(schedule, _resolve_config(config, config_fields))
    _check_choice("SamplerConfig.sampler (invert)", config.sampler, INVERTIBLE_SAMPLERS)
    if config.eta != 0:
        raise ValueError(f"SamplerConfig.eta={config.eta}: inversion is deterministic, use eta=0")
    if config.prediction == "x0":
        raise ValueError("SamplerConfig.prediction='x0' cannot be inverted from the clean end (sigma = 0)")
    flow = isinstance(schedule, FlowSchedule)
    model_t, alpha, sigma, _ = grid(schedule, dataclasses.replace(config, sampler="euler") if flow else config)
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
