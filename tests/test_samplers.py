"""ldm_jax.diffusion.samplers and .guidance: diffusers parity, ADM/DiT respacing, closed-form
Gaussian data, inversion, sharding, compile-once and classifier-free guidance."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ldm_jax.diffusion import sampler_plans, samplers, schedules
from ldm_jax.diffusion.guidance import Guidance, classifier_free_guidance
from ldm_jax.diffusion.samplers import SamplerConfig


def denoiser(x, t, cond):
    """The closed-form denoiser of tools/fixtures/samplers.py: 0.3·tanh(x) + 0.1·x·cos(t/1000)."""
    t = (t / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.3 * jnp.tanh(x) + 0.1 * x * jnp.cos(t)


def learned_variance_denoiser(x, t, cond):
    """... plus the learned-variance half tanh(0.7·x - t/1000)."""
    tt = (t / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.concatenate([denoiser(x, t, cond), jnp.tanh(0.7 * x - tt)], axis=-1)


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ---------------------------------------------------------------------------------------------
# Parity with diffusers (fixtures from tools/fixtures/samplers.py).
# ---------------------------------------------------------------------------------------------

# Case names are needed at collection time (parametrize), so the JSON is read at import.
DIFFUSERS_CASES = json.loads((pathlib.Path(__file__).parent / "fixtures" / "samplers_diffusers.json").read_text())
_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}


def _our_setup(case):
    """The (schedule, SamplerConfig) equivalent to a diffusers scheduler configuration."""
    kind, c = case["scheduler"], case["config"]
    if kind == "flow_euler":
        t_min = schedules.time_shift(1 / 1000, c["shift"])  # diffusers' sigma_min, shifted once more
        return schedules.FlowSchedule(time_scale=1000.0), SamplerConfig(
            "euler", case["num_steps"], prediction="velocity", shift=c["shift"], t_min=t_min)
    schedule = schedules.discrete_schedule(_BETAS[c["beta_schedule"]], beta_start=c.get("beta_start"),
                                           beta_end=c.get("beta_end"),
                                           zero_terminal_snr=c.get("rescale_betas_zero_snr", False))
    clip = c.get("clip_sample", True) and kind in ("ddpm", "ddim")  # diffusers' default: clip on
    return schedule, SamplerConfig(
        kind, case["num_steps"], prediction=_PREDICTIONS[c.get("prediction_type", "epsilon")],
        spacing=c.get("timestep_spacing", "leading" if kind in ("ddpm", "ddim") else "linspace"),
        steps_offset=c.get("steps_offset", 0), eta=case["step_kwargs"].get("eta", 0.0),
        variance=c.get("variance_type", "fixed_small"), clip_x0=1.0 if clip else None)


@pytest.fixture(scope="module")
def diffusers_arrays(fixtures_dir):
    return np.load(fixtures_dir / "samplers_diffusers.npz")


@pytest.mark.parametrize("name", sorted(DIFFUSERS_CASES))
def test_matches_diffusers_every_step(diffusers_arrays, name):
    case = DIFFUSERS_CASES[name]
    get = lambda key: diffusers_arrays[f"{name}/{key}"]  # noqa: E731
    schedule, config = _our_setup(case)
    x, states = get("noise") * get("init_noise_sigma"), get("states")
    if case["scheduler"] == "euler":  # diffusers keeps x·sqrt(1 + sigma²); we keep x
        sigmas = get("sigmas")
        x = x / np.sqrt(1 + sigmas[0] ** 2)
        states = states / np.sqrt(1 + sigmas[1:] ** 2).reshape(-1, 1, 1, 1, 1)
    np.testing.assert_allclose(sampler_plans.make_plan(schedule, config)["model_t"], get("timesteps"), rtol=1e-6)
    fn = learned_variance_denoiser if config.variance == "learned_range" else denoiser
    step_noise = jnp.asarray(get("step_noise")) if samplers._is_stochastic(config) else None
    final, trajectory = samplers.sample(fn, jnp.asarray(x), schedule=schedule, config=config,
                                        step_noise=step_noise, return_trajectory=True)
    final_err = _rel(final, states[-1])
    step_err = max(_rel(trajectory[i], states[i]) for i in range(len(states)))
    print(f"{name}: final {final_err:.2e}, worst step {step_err:.2e} ({len(states)} steps)")
    assert final_err <= 1e-5 and step_err <= 1e-5
    np.testing.assert_array_equal(trajectory[-1], final)


# ---------------------------------------------------------------------------------------------
# ADM / DiT respaced DDPM ("250"-style) against ADM's p_sample loop in float64.
# ---------------------------------------------------------------------------------------------


def _adm_p_sample_loop(x, step_noise, section_counts):
    """SpacedDiffusion(space_timesteps(1000, section_counts)) p_sample_loop of gaussian_diffusion.py:
    LEARNED_RANGE, EPSILON, clip_denoised=False; float64."""
    betas = np.linspace(1e-4, 0.02, 1000)
    ab_full = np.cumprod(1 - betas)
    use = sorted(schedules.space_timesteps(1000, section_counts))
    last, new_betas = 1.0, []
    for i in use:  # SpacedDiffusion.__init__
        new_betas.append(1 - ab_full[i] / last)
        last = ab_full[i]
    betas = np.array(new_betas)
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:]))
    coef1, coef2 = betas * np.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * np.sqrt(alphas) / (1 - ab)
    x = np.asarray(x, np.float64)
    for n, i in enumerate(reversed(range(len(use)))):
        eps = 0.3 * np.tanh(x) + 0.1 * x * np.cos(use[i] / 1000)  # learned_variance_denoiser in NumPy
        v = np.tanh(0.7 * x - use[i] / 1000)
        frac = (v + 1) / 2
        log_var = frac * np.log(betas[i]) + (1 - frac) * post_log_var_clipped[i]
        x0 = np.sqrt(1 / ab[i]) * x - np.sqrt(1 / ab[i] - 1) * eps
        mean = coef1[i] * x0 + coef2[i] * x
        x = mean + (i != 0) * np.exp(0.5 * log_var) * np.asarray(step_noise[n], np.float64)
    return x


@pytest.mark.slow
def test_ddpm_respaced_matches_adm_dit_sampling():
    section_counts = "25"  # DiT samples with "250"; same code path, fewer steps
    full = schedules.discrete_schedule("linear")
    spaced = schedules.respace(full, schedules.space_timesteps(1000, section_counts))
    key_x, key_n = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (2, 4, 4, 4))
    step_noise = jax.random.normal(key_n, (25, 2, 4, 4, 4))
    ref = _adm_p_sample_loop(x, step_noise, section_counts)
    config = SamplerConfig("ddpm", 25, variance="learned_range")
    ours = samplers.sample(learned_variance_denoiser, x, schedule=spaced, config=config, step_noise=step_noise)
    assert _rel(ours, ref) <= 1e-5
    # The same run as linspace spacing over the full schedule (diffusers' DDPMScheduler view).
    linspace = samplers.sample(learned_variance_denoiser, x, schedule=full, step_noise=step_noise,
                               config=SamplerConfig("ddpm", 25, spacing="linspace", variance="learned_range"))
    assert _rel(linspace, ours) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Closed form: Gaussian data N(mu, s²) has an exact denoiser.
# ---------------------------------------------------------------------------------------------

MU, STD = 1.5, 0.5


def gaussian_oracle(schedule, prediction):
    """The exact denoiser for data N(MU, STD²) under `schedule`, returning `prediction`."""
    if isinstance(schedule, schedules.FlowSchedule):
        level = lambda t: (1.0 - t / schedule.time_scale, t / schedule.time_scale)  # noqa: E731
    else:
        ab = schedule.alphas_cumprod_float64
        ve = jnp.asarray(np.sqrt((1 - ab) / ab), jnp.float32)

        def level(t):  # linear in diffusers' VE sigma between integer timesteps (Euler's fractional t)
            sigma_ve = jnp.interp(t, jnp.arange(len(ab), dtype=jnp.float32), ve)
            alpha = 1.0 / jnp.sqrt(1.0 + sigma_ve**2)
            return alpha, sigma_ve * alpha

    def fn(x, t, cond):
        alpha, sigma = (v.reshape(-1, 1) for v in level(t))
        var = alpha**2 * STD**2 + sigma**2
        x0 = MU + alpha * STD**2 / var * (x - alpha * MU)
        eps = sigma / var * (x - alpha * MU)
        return {"epsilon": eps, "x0": x0, "v": alpha * eps - sigma * x0, "velocity": eps - x0}[prediction]

    return fn


CLOSED_FORM_CASES = [
    ("linear", SamplerConfig("ddpm", 1000, variance="fixed_small")),
    ("linear", SamplerConfig("ddpm", 500, spacing="trailing", variance="fixed_large", prediction="x0")),
    ("linear", SamplerConfig("ddim", 100)),
    ("scaled_linear", SamplerConfig("ddim", 500, eta=1.0, prediction="v")),  # ancestral: fine steps
    ("cosine", SamplerConfig("dpm_solver++", 50, spacing="trailing")),
    ("linear", SamplerConfig("euler", 100)),
    ("flow", SamplerConfig("euler", 100, prediction="velocity")),
    ("flow", SamplerConfig("heun", 30, shift=3.0)),  # prediction defaults to velocity on a flow
    ("flow", SamplerConfig("euler_maruyama", 250, t_min=0.04)),  # REPA's SDE grid
    ("flow", SamplerConfig("dpm_solver++", 30)),
]


@pytest.mark.parametrize("schedule_name, config", CLOSED_FORM_CASES,
                         ids=[f"{c.sampler}-{s}-{c.prediction}" for s, c in CLOSED_FORM_CASES])
def test_closed_form_gaussian(schedule_name, config):
    flow = schedule_name == "flow"
    schedule = schedules.FlowSchedule() if flow else schedules.discrete_schedule(schedule_name)
    prediction = config.prediction or ("velocity" if flow else "epsilon")
    key_x, key_s = jax.random.split(jax.random.key(1))
    noise = jax.random.normal(key_x, (10_000, 1))
    x = samplers.sample(gaussian_oracle(schedule, prediction), noise, schedule=schedule, config=config, key=key_s)
    mean, std = float(jnp.mean(x)), float(jnp.std(x))
    print(f"{config.sampler}: mean {mean:.4f} (mu {MU}), std {std:.4f} (sigma {STD})")
    assert abs(mean - MU) <= 0.02 * MU and abs(std - STD) <= 0.02 * STD


def _round_trip_errors(schedule, config, prediction, noise, data=None):
    """(|invert(x0) - noise|, |sample(invert(x0)) - x0|) max errors; x0 = sample(noise) unless given."""
    fn = gaussian_oracle(schedule, prediction)
    x0 = samplers.sample(fn, noise, schedule=schedule, config=config) if data is None else data
    latent = samplers.invert(fn, x0, schedule=schedule, config=config)
    back = samplers.sample(fn, latent, schedule=schedule, config=config)
    return float(jnp.max(jnp.abs(latent - noise))), float(jnp.max(jnp.abs(back - x0)))


def test_ddim_is_deterministic_and_inverts():
    schedule = schedules.discrete_schedule("linear")
    noise = jax.random.normal(jax.random.key(2), (512, 1))
    config = SamplerConfig("ddim", 200)
    fn = gaussian_oracle(schedule, "epsilon")
    a = samplers.sample(fn, noise, schedule=schedule, config=config)
    b = samplers.sample(fn, noise, schedule=schedule, config=config, key=jax.random.key(9))
    np.testing.assert_array_equal(a, b)
    # Inversion is first order: noise and data round-trip with an error ~ 1/num_steps.
    coarse = _round_trip_errors(schedule, config, "epsilon", noise)
    fine = _round_trip_errors(schedule, SamplerConfig("ddim", 1000), "epsilon", noise)
    print(f"DDIM inversion, 200 steps: noise {coarse[0]:.3g}, data {coarse[1]:.3g}; 1000: {fine}")
    assert coarse[0] < 0.15 and coarse[1] < 0.07  # |noise| up to 3.8, |data| up to 3
    assert fine[0] < coarse[0] / 3 and fine[1] < coarse[1] / 3


def test_flow_euler_inverts():
    schedule = schedules.FlowSchedule()
    data = MU + STD * jax.random.normal(jax.random.key(3), (512, 1))
    zeros = jnp.zeros_like(data)
    coarse = _round_trip_errors(schedule, SamplerConfig("euler", 200, prediction="velocity"), "velocity", zeros, data)
    fine = _round_trip_errors(schedule, SamplerConfig("euler", 1000, prediction="velocity"), "velocity", zeros, data)
    print(f"flow Euler inversion round trip, 200 steps: {coarse[1]:.3g}; 1000 steps: {fine[1]:.3g}")
    assert coarse[1] < 0.02 and fine[1] < coarse[1] / 3


# ---------------------------------------------------------------------------------------------
# Sharding and compilation.
# ---------------------------------------------------------------------------------------------


def labelled_denoiser(x, t, cond):
    """A conditional closed-form denoiser: labels shift the output."""
    return denoiser(x, t, None) + 0.05 * cond.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.mark.parametrize("config", [
    SamplerConfig("ddim", 8),
    SamplerConfig("ddpm", 8, spacing="trailing"),
    SamplerConfig("dpm_solver++", 8),
], ids=lambda c: c.sampler)
def test_batch_sharded_inputs_stay_sharded(config):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    schedule = schedules.discrete_schedule("linear")
    noise = jax.random.normal(jax.random.key(4), (16, 4, 4, 4))
    labels = jnp.arange(16) % 5
    guidance = Guidance(3.0, null_cond=5, interval=(0.0, 0.7), guided_channels=3)
    kwargs = dict(schedule=schedule, config=config, key=jax.random.key(5), guidance=guidance,
                  return_trajectory=True)
    ref, ref_traj = samplers.sample(labelled_denoiser, noise, labels, **kwargs)
    sharded_noise, sharded_labels = jax.device_put(noise, batch), jax.device_put(labels, batch)
    out, traj = samplers.sample(labelled_denoiser, sharded_noise, sharded_labels, **kwargs)
    assert out.sharding.is_equivalent_to(sharded_noise.sharding, out.ndim)
    assert traj.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(None, "data")), traj.ndim)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(traj, ref_traj, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("schedule, config", [
    (schedules.discrete_schedule("linear"), SamplerConfig("ddpm", 6)),
    (schedules.discrete_schedule("linear"), SamplerConfig("ddim", 6, eta=1.0)),
    (schedules.FlowSchedule(), SamplerConfig("euler_maruyama", 6)),
], ids=lambda v: getattr(v, "sampler", ""))
@pytest.mark.slow
def test_per_sample_keys_make_each_sample_independent_of_its_batch(schedule, config):
    keys = jax.random.split(jax.random.key(3), 8)
    noise = jax.random.normal(jax.random.key(4), (8, 2, 2, 4))
    run = lambda x, k: np.asarray(samplers.sample(denoiser, x, schedule=schedule, config=config, key=k))  # noqa: E731
    batch = run(noise, keys)
    order = np.array([5, 2, 7, 0, 4, 1, 6, 3])
    np.testing.assert_array_equal(run(noise[order], keys[order]), batch[order])
    np.testing.assert_array_equal(run(noise[2:3], keys[2:3]), batch[2:3])
    np.testing.assert_array_equal(run(noise, jax.random.key_data(keys)), batch)  # raw uint32 [B, 2] keys
    sharding = NamedSharding(jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)),
                             PartitionSpec("data"))
    np.testing.assert_array_equal(run(jax.device_put(noise, sharding), jax.device_put(keys, sharding)), batch)
    other = run(noise, jax.random.split(jax.random.key(9), 8))
    assert np.all(np.abs(other - batch).max(axis=(1, 2, 3)) > 1e-3)  # every sample uses its own noise
    with pytest.raises(ValueError, match="4 per-sample keys for a batch of 8"):
        run(noise, keys[:4])


def test_compiles_once_per_shape_and_steps():
    schedule = schedules.discrete_schedule("linear")
    apply = jax.tree_util.Partial(lambda scale, x, t, c: scale * denoiser(x, t, c), jnp.float32(1.0))
    config = SamplerConfig("dpm_solver++", 12)

    def run(scale, guidance_scale, seed, batch=4):
        fn = jax.tree_util.Partial(apply.func, jnp.float32(scale))  # new "parameters", same function
        noise = jax.random.normal(jax.random.key(seed), (batch, 2, 2, 4))
        guidance = Guidance(guidance_scale, null_cond=0)
        return samplers.sample(fn, noise, jnp.ones(batch, jnp.int32), schedule=schedule, config=config,
                               guidance=guidance)

    before = samplers.compiled_loop_count()
    first = run(1.0, 2.0, 0)
    assert samplers.compiled_loop_count() == before + 1
    second = run(0.5, 4.0, 1)  # new params, guidance scale and noise: no recompilation
    assert samplers.compiled_loop_count() == before + 1
    assert not np.allclose(first, second)
    run(1.0, 2.0, 0, batch=8)  # a new shape compiles once more
    assert samplers.compiled_loop_count() == before + 2


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance.
# ---------------------------------------------------------------------------------------------


def _two_outputs(x, t, cond):
    """Output depends on the label (null = 0) and channel, for checking the guidance formula."""
    c = cond.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return x * (1.0 + c) + jnp.arange(x.shape[-1], dtype=x.dtype) + 0 * t.reshape(c.shape)


def test_guidance_formula_channels_and_single_call():
    x = jax.random.normal(jax.random.key(6), (3, 2, 2, 4))
    t = jnp.full((3,), 500.0)
    labels = jnp.array([1, 2, 3])
    batch_sizes = []

    def counting(x, t, cond):
        batch_sizes.append(x.shape[0])
        return _two_outputs(x, t, cond)

    cond_out, uncond_out = _two_outputs(x, t, labels), _two_outputs(x, t, jnp.zeros(3))
    guided = jax.jit(classifier_free_guidance(counting, Guidance(4.0, null_cond=0), time_scale=1000.0))(x, t, labels)
    assert batch_sizes == [6]  # cond and uncond in one call
    np.testing.assert_allclose(guided, uncond_out + 4.0 * (cond_out - uncond_out), rtol=1e-6)
    # DiT's released sampler: guide 3 of the 4 channels, the 4th is the conditional output.
    dit = jax.jit(classifier_free_guidance(_two_outputs, Guidance(4.0, null_cond=0, guided_channels=3)))(x, t, labels)
    np.testing.assert_allclose(dit[..., :3], guided[..., :3], rtol=1e-6)
    np.testing.assert_allclose(dit[..., 3], cond_out[..., 3], rtol=1e-6)


def test_guidance_with_learned_sigma():
    x = jax.random.normal(jax.random.key(7), (2, 2, 2, 4))
    t, labels = jnp.full((2,), 10.0), jnp.array([3, 4])

    def learned(x, t, cond):
        return jnp.concatenate([_two_outputs(x, t, cond), jnp.tanh(_two_outputs(x, t, cond))], axis=-1)

    c, u = learned(x, t, labels), learned(x, t, jnp.zeros(2))
    out = jax.jit(classifier_free_guidance(learned, Guidance(1.5, null_cond=0, guided_channels=3)))(x, t, labels)
    np.testing.assert_allclose(out[..., :3], u[..., :3] + 1.5 * (c[..., :3] - u[..., :3]), rtol=1e-6)
    np.testing.assert_allclose(out[..., 3:], c[..., 3:], rtol=1e-6)  # 4th eps channel and the variance half


def test_guidance_interval():
    x = jax.random.normal(jax.random.key(8), (2, 2, 2, 4))
    labels = jnp.array([1, 2])
    guided = classifier_free_guidance(_two_outputs, Guidance(3.0, null_cond=0, interval=(0.2, 0.6)),
                                      time_scale=1000.0)
    full = classifier_free_guidance(_two_outputs, Guidance(3.0, null_cond=0), time_scale=1000.0)
    for t, inside in ((100.0, False), (200.0, True), (400.0, True), (600.0, True), (800.0, False)):
        tt = jnp.full((2,), t)
        expected = jax.jit(full)(x, tt, labels) if inside else _two_outputs(x, tt, labels)
        np.testing.assert_allclose(jax.jit(guided)(x, tt, labels), expected, rtol=1e-6, err_msg=str(t))


@pytest.mark.parametrize("kwargs, match", [
    (dict(interval=(-0.1, 0.5)), "Guidance.interval"),
    (dict(interval=(0.2, 1.5)), "Guidance.interval"),
    (dict(interval=(0.8, 0.2)), "Guidance.interval"),
    (dict(guided_channels=0), "Guidance.guided_channels"),
    (dict(scale=float("nan")), "sample.guidance_scale"),
    (dict(scale=float("inf")), "sample.guidance_scale"),
])
def test_guidance_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Guidance(**{"scale": 2.0, "null_cond": 0, **kwargs})


def test_guidance_rejects_too_many_channels():
    fn = classifier_free_guidance(_two_outputs, Guidance(2.0, null_cond=0, guided_channels=5))
    with pytest.raises(ValueError, match="guided_channels"):
        fn(jnp.ones((1, 2, 2, 4)), jnp.ones((1,)), jnp.ones((1,)))


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda s: SamplerConfig("plms"), r"SamplerConfig.sampler='plms'.*'ddpm', 'ddim'"),
    (lambda s: SamplerConfig(prediction="score"), "SamplerConfig.prediction"),
    (lambda s: SamplerConfig(spacing="karras"), "SamplerConfig.spacing"),
    (lambda s: SamplerConfig(variance="learned"), "SamplerConfig.variance"),
    (lambda s: SamplerConfig(num_steps=0), "SamplerConfig.num_steps"),
    (lambda s: sampler_plans.make_plan(s, SamplerConfig("ddim", 1001)), r"num_steps=1001 must be in \[1, 1000\]"),
    (lambda s: sampler_plans.make_plan(s, SamplerConfig("heun")), r"sampler \(DiscreteSchedule\)"),
    (lambda s: sampler_plans.make_plan(schedules.FlowSchedule(), SamplerConfig("ddim")), r"sampler \(FlowSchedule\)"),
    (lambda s: sampler_plans.make_plan(schedules.FlowSchedule(), SamplerConfig("euler", prediction="epsilon")),
     r"prediction \(FlowSchedule\)"),
    (lambda s: sampler_plans.make_plan(s, SamplerConfig("euler", prediction="velocity")),
     r"prediction \(DiscreteSchedule\)"),
    (lambda s: sampler_plans.make_plan("linear", SamplerConfig()), "DiscreteSchedule or FlowSchedule"),
    (lambda s: samplers.sample(denoiser, jnp.ones((1, 4)), schedule=s, sampler="ddpm"), "key= or step_noise="),
    (lambda s: samplers.sample(denoiser, jnp.ones((1, 4)), schedule=s, config=SamplerConfig(), sampler="ddpm"),
     "either config= or config fields"),
    (lambda s: samplers.sample(denoiser, jnp.ones((1, 4)), schedule=s, sampler="ddpm", num_steps=3,
                               step_noise=jnp.ones((2, 1, 4))), "step_noise has shape"),
    (lambda s: samplers.sample(denoiser, jnp.ones((1, 4)), schedule=s, sampler="ddpm", key=jax.random.key(0),
                               variance="learned_range", num_steps=3), "learned_range"),
    (lambda s: samplers.invert(denoiser, jnp.ones((1, 4)), schedule=s, sampler="dpm_solver++"),
     r"SamplerConfig.sampler \(invert\)"),
    (lambda s: samplers.invert(denoiser, jnp.ones((1, 4)), schedule=s, sampler="ddim", eta=0.5),
     "SamplerConfig.eta"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(schedules.discrete_schedule("linear"))
