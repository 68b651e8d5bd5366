"""Training-free inpainting (RePaint) in ldm_jax.diffusion.samplers: diffusers parity, exact known
region, the inpainted distribution against the closed-form conditional of Gaussian data, per-sample
keys and sharding, bad input."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ldm_jax.diffusion import sampler_plans, samplers, schedules
from ldm_jax.diffusion.samplers import Inpainting, SamplerConfig


def gaussian_oracle(mean, cov, schedule, prediction="epsilon"):
    """The exact denoiser for data whose last axis is N(mean, cov) (the JAX twin of
    tools/fixtures/repaint.py's OracleUNet): ε̂ = σ·P(x - α·mean), x̂0 = mean + α·cov·P(x - α·mean),
    P = (α²·cov + σ²·I)^-1; returns ε̂ ("epsilon") or ε̂ - x̂0 ("velocity", FlowSchedule)."""
    lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
    lam, u, mean = (jnp.asarray(v, jnp.float32) for v in (lam, u, mean))
    flow = isinstance(schedule, schedules.FlowSchedule)

    def fn(x, t, cond):
        if flow:
            alpha, sigma = 1.0 - t / schedule.time_scale, t / schedule.time_scale
        else:
            i = t.astype(jnp.int32)
            alpha = jnp.asarray(schedule.sqrt_alphas_cumprod)[i]
            sigma = jnp.asarray(schedule.sqrt_one_minus_alphas_cumprod)[i]
        a, s = (v.reshape((-1,) + (1,) * (x.ndim - 1)) for v in (alpha, sigma))
        y = (x - a * mean) @ u / (a**2 * lam + s**2)  # P(x - α·mean) in the eigenbasis of cov
        eps = s * (y @ u.T)
        return eps if prediction == "epsilon" else eps - (mean + a * ((y * lam) @ u.T))

    return fn


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ---------------------------------------------------------------------------------------------
# Parity with diffusers' RePaintPipeline (fixture from tools/fixtures/repaint.py).
# ---------------------------------------------------------------------------------------------

# Case names are needed at collection time (parametrize), so the fixture is opened at import.
FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures" / "repaint_diffusers.npz")
CASES = sorted({key.split("/")[0] for key in FIXTURE.files if "/" in key})


@pytest.mark.parametrize("name", CASES)
def test_matches_diffusers_repaint_every_entry(name):
    get = lambda key: FIXTURE[f"{name}/{key}"]  # noqa: E731
    T, N, eta, clip, jump_length, jump_n_sample, beta_start, beta_end = get("settings")
    T, N = int(T), int(N)
    schedule = schedules.discrete_schedule("linear", T, beta_start=beta_start, beta_end=beta_end)
    inpaint = Inpainting(jnp.asarray(get("known")), jnp.asarray(get("mask")), int(jump_length), int(jump_n_sample))
    # The grid with jumps is diffusers': its timesteps, forward where they go up.
    steps, forward = sampler_plans.resampling_steps(N, int(jump_length), int(jump_n_sample))
    timesteps = get("timesteps")
    np.testing.assert_array_equal((N - 1 - steps) * (T // N), timesteps)
    np.testing.assert_array_equal(forward[1:], np.diff(timesteps) > 0)
    configs = [SamplerConfig("ddim", N, eta=float(eta), clip_x0=1.0 if clip else None)]
    if eta == 1.0 and not clip:  # DDIM with eta = 1 is DDPM's posterior step
        configs.append(SamplerConfig("ddpm", N))
    states = get("states")
    fn = gaussian_oracle(FIXTURE["mean"], FIXTURE["cov"], schedule)
    for config in configs:
        final, trajectory = samplers.sample(fn, jnp.asarray(get("noise")), schedule=schedule, config=config,
                                            step_noise=jnp.asarray(get("step_noise")), inpaint=inpaint,
                                            return_trajectory=True)
        worst = max(_rel(trajectory[e], states[e]) for e in range(len(states)))
        print(f"{name} {config.sampler}: {len(states)} entries, worst {worst:.2e}, final {_rel(final, states[-1]):.2e}")
        assert worst <= 1e-5
        mask = get("mask")
        np.testing.assert_array_equal(np.asarray(final) * mask, get("known") * mask)


# ---------------------------------------------------------------------------------------------
# The known region is exact; the loop compiles once per shape.
# ---------------------------------------------------------------------------------------------

MEAN3 = np.array([0.5, -0.5, 0.2])
COV3 = np.array([[1.0, 0.8, -0.5], [0.8, 1.0, -0.3], [-0.5, -0.3, 0.6]])


@pytest.mark.parametrize("flow, config", [
    (False, SamplerConfig("ddpm", 12, spacing="trailing")),
    (False, SamplerConfig("ddim", 12, spacing="linspace")),  # lands on t - T//N, off the grid
    (True, SamplerConfig("euler_maruyama", 12)),
], ids=lambda v: getattr(v, "sampler", ""))
def test_known_region_is_exact_at_the_end(flow, config):
    schedule = schedules.FlowSchedule() if flow else schedules.discrete_schedule("linear")
    fn = gaussian_oracle(MEAN3, COV3, schedule, "velocity" if flow else "epsilon")
    keys = jax.random.split(jax.random.key(0), 3)
    noise = jax.random.normal(keys[0], (4, 3, 3, 3))
    mask = (jax.random.uniform(keys[1], (4, 3, 3, 1)) < 0.5).astype(jnp.float32)

    def run(seed):
        known = jax.random.normal(jax.random.key(seed), noise.shape)
        out = samplers.sample(fn, noise, schedule=schedule, config=config, key=keys[2],
                              inpaint=Inpainting(known, mask, jump_length=3, jump_n_sample=3))
        np.testing.assert_array_equal(out * mask, known * mask)
        assert np.all(np.isfinite(out)) and np.abs(out - known).max() > 0.1  # the unknown region is generated

    run(1)
    before = samplers.compiled_loop_count()
    run(2)  # new known values: no recompilation
    assert samplers.compiled_loop_count() == before


# ---------------------------------------------------------------------------------------------
# Closed form: the conditional of Gaussian data.
# ---------------------------------------------------------------------------------------------


def _gaussian_w2(m1, c1, m2, c2) -> float:
    """2-Wasserstein distance between N(m1, c1) and N(m2, c2)."""
    def sqrtm(c):
        w, v = np.linalg.eigh(c)
        return (v * np.sqrt(np.maximum(w, 0))) @ v.T
    root = sqrtm(c2)
    return float(np.sqrt(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * sqrtm(root @ c1 @ root))))


def test_inpainting_gaussian_data_approaches_the_true_conditional():
    """x ~ N(MEAN3, COV3), known x_0 = 2 (2 sd out): the inpainted (x_1, x_2) should follow the exact
    conditional; RePaint's replacement alone is biased towards the marginal, resampling removes most."""
    schedule = schedules.discrete_schedule("linear")
    fn = gaussian_oracle(MEAN3, COV3, schedule)
    c = 2.0
    cond_mean = MEAN3[1:] + COV3[1:, 0] / COV3[0, 0] * (c - MEAN3[0])
    cond_cov = COV3[1:, 1:] - np.outer(COV3[1:, 0], COV3[0, 1:]) / COV3[0, 0]
    marginal = _gaussian_w2(MEAN3[1:], COV3[1:, 1:], cond_mean, cond_cov)
    noise = jax.random.normal(jax.random.key(0), (4000, 3))
    known = jnp.zeros_like(noise).at[:, 0].set(c)
    mask = jnp.zeros_like(noise).at[:, 0].set(1.0)
    distance = {}
    for config in (SamplerConfig("ddpm", 100), SamplerConfig("ddim", 100)):
        for jump_n_sample in (1, 10):
            x = samplers.sample(fn, noise, schedule=schedule, config=config, key=jax.random.key(1),
                                inpaint=Inpainting(known, mask, jump_length=10, jump_n_sample=jump_n_sample))
            x = np.asarray(x, np.float64)
            assert np.all(x[:, 0] == c)
            mean, cov = x[:, 1:].mean(0), np.cov(x[:, 1:].T)
            distance[config.sampler, jump_n_sample] = d = _gaussian_w2(mean, cov, cond_mean, cond_cov)
            print(f"{config.sampler} r={jump_n_sample}: mean {np.round(mean, 3)} (true {np.round(cond_mean, 3)}), "
                  f"cov {np.round(cov, 3).tolist()} (true {np.round(cond_cov, 3).tolist()}), W2 {d:.3f}")
    print(f"W2(marginal, conditional) = {marginal:.3f}")
    for sampler in ("ddpm", "ddim"):
        assert distance[sampler, 10] < 0.15 * marginal
        assert distance[sampler, 1] > 3 * distance[sampler, 10]


# ---------------------------------------------------------------------------------------------
# Per-sample keys and sharding.
# ---------------------------------------------------------------------------------------------


def test_per_sample_keys_and_sharding():
    schedule = schedules.discrete_schedule("linear")
    # Elementwise, so that no batch-size-dependent matmul blocking enters the comparison.
    fn = lambda x, t, c: 0.3 * jnp.tanh(x) + 0.1 * x * jnp.cos(t / 1000).reshape(-1, 1, 1, 1)  # noqa: E731
    keys = jax.random.split(jax.random.key(3), 8)
    noise = jax.random.normal(jax.random.key(4), (8, 2, 2, 3))
    known = jax.random.normal(jax.random.key(5), noise.shape)
    mask = jnp.zeros((8, 2, 2, 1)).at[:, :, :1].set(1.0)
    config = SamplerConfig("ddim", 8)

    def run(x, k, kn, m):
        inpaint = Inpainting(kn, m, jump_length=2, jump_n_sample=3)
        return np.asarray(samplers.sample(fn, x, schedule=schedule, config=config, key=k, inpaint=inpaint))

    batch = run(noise, keys, known, mask)
    order = np.array([5, 2, 7, 0, 4, 1, 6, 3])
    np.testing.assert_array_equal(run(noise[order], keys[order], known[order], mask[order]), batch[order])
    np.testing.assert_array_equal(run(noise[2:3], keys[2:3], known[2:3], mask[2:3]), batch[2:3])
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    put = lambda v: jax.device_put(v, NamedSharding(mesh, PartitionSpec("data")))  # noqa: E731
    np.testing.assert_array_equal(run(put(noise), put(keys), put(known), put(mask)), batch)
    other = run(noise, jax.random.split(jax.random.key(9), 8), known, mask)
    assert np.all(np.abs(other - batch).max(axis=(1, 2, 3)) > 1e-3)  # every sample uses its own noise


def test_resampling_steps():
    steps, forward = sampler_plans.resampling_steps(6, 2, 2)
    # diffusers' timesteps 5 4 3 2 3 4 3 2 1 0 1 2 1 0 as base steps (0 = noisiest)
    np.testing.assert_array_equal(steps, [0, 1, 2, 3, 2, 1, 2, 3, 4, 5, 4, 3, 4, 5])
    np.testing.assert_array_equal(np.flatnonzero(forward), [4, 5, 10, 11])
    np.testing.assert_array_equal(sampler_plans.resampling_steps(6, 2, 1)[0], np.arange(6))


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------

_X = jnp.zeros((2, 4, 4, 3))


@pytest.mark.parametrize("inpaint, kwargs, match", [
    (lambda: Inpainting(_X, jnp.ones((2, 4, 3, 3)), 2, 2), {},
     r"Inpainting.mask has shape \(2, 4, 3, 3\).*noise's shape \(2, 4, 4, 3\)"),
    (lambda: Inpainting(_X, jnp.full((2, 4, 4, 1), 2.0), 2, 2), {}, r"Inpainting.mask values must lie in \[0, 1\]"),
    (lambda: Inpainting(_X, jnp.full((2, 4, 4, 3), -0.5), 2, 2), {}, r"Inpainting.mask values must lie in \[0, 1\]"),
    (lambda: Inpainting(_X, jnp.full((2, 4, 4, 3), jnp.nan), 2, 2), {}, r"Inpainting.mask values"),
    (lambda: Inpainting(_X[:1], jnp.ones((2, 4, 4, 3)), 2, 2), {}, r"Inpainting.known has shape \(1, 4, 4, 3\)"),
    (lambda: Inpainting(_X, _X, jump_length=0), {}, "Inpainting.jump_length=0"),
    (lambda: Inpainting(_X, _X, jump_n_sample=0), {}, "Inpainting.jump_n_sample=0"),
    (lambda: Inpainting(_X, _X, 8, 2), {}, "Inpainting.jump_length=8 must be < num_steps=8"),
    (lambda: Inpainting(_X, _X, 2, 2), dict(sampler="dpm_solver++"),
     r"SamplerConfig.sampler \(inpainting\)='dpm_solver\+\+'"),
    (lambda: Inpainting(_X, _X, 2, 2), dict(key=None), "inpainting is stochastic here: pass key= or step_noise="),
    (lambda: Inpainting(_X, _X, 2, 2), dict(key=None, step_noise=jnp.zeros((8,) + _X.shape)),
     r"step_noise has shape \(8, 2, 4, 4, 3\); expected \(20, 2, 4, 4, 3\)"),
])
def test_bad_input_raises_value_error(inpaint, kwargs, match):
    kwargs = dict(dict(sampler="ddim", num_steps=8, key=jax.random.key(0)), **kwargs)
    with pytest.raises(ValueError, match=match):
        samplers.sample(lambda x, t, c: x, _X, schedule=schedules.discrete_schedule("linear"),
                        inpaint=inpaint(), **kwargs)
