"""ldm_jax.diffusion.schedules: beta tables and inference grids against diffusers; ADM respacing; flow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import schedules


@pytest.fixture(scope="module")
def tables(fixtures_dir):
    return np.load(fixtures_dir / "samplers_schedules.npz")


def _rel(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("fixture_name, kwargs", [
    ("linear", dict(beta_schedule="linear")),
    ("scaled_linear", dict(beta_schedule="scaled_linear")),
    ("cosine", dict(beta_schedule="cosine")),
    ("linear_zsnr", dict(beta_schedule="linear", zero_terminal_snr=True)),
])
def test_beta_schedules_match_diffusers(tables, fixture_name, kwargs):
    sched = schedules.discrete_schedule(**kwargs)
    assert sched.betas.dtype == np.float32 and sched.num_timesteps == 1000
    # diffusers builds these in float32 (zero-SNR rescaling too), we in float64: agreement to its rounding.
    assert _rel(sched.betas, tables[f"betas/{fixture_name}"]) <= 5e-6
    assert _rel(sched.alphas_cumprod, tables[f"alphas_cumprod/{fixture_name}"]) <= 1e-6


def test_tables_are_float64_accurate():
    sched = schedules.discrete_schedule("linear")
    ab = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(sched.alphas_cumprod, ab, rtol=1e-7)
    # 1 - ab_0 = 1e-4 would keep only ~3 digits if taken from a float32 ab_0.
    np.testing.assert_allclose(sched.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ab), rtol=1e-7)
    np.testing.assert_array_equal(sched.model_timesteps, np.arange(1000))


def test_zero_terminal_snr():
    base = schedules.discrete_schedule("scaled_linear")
    zsnr = schedules.discrete_schedule("scaled_linear", zero_terminal_snr=True)
    assert zsnr.alphas_cumprod[-1] == 0.0 and zsnr.betas[-1] == 1.0
    np.testing.assert_allclose(zsnr.sqrt_alphas_cumprod[0], base.sqrt_alphas_cumprod[0], rtol=1e-7)
    assert np.all(np.diff(zsnr.alphas_cumprod) < 0)


def test_inference_timesteps_match_diffusers(tables):
    keys = [k for k in tables.files if k.startswith("timesteps/")]
    assert len(keys) == 45  # 3 schedulers x 3 spacings x 5 step counts
    for key in keys:
        _, convention, spacing, steps, offset = key.split("/")
        ours = schedules.inference_timesteps(1000, int(steps), spacing, int(offset), convention)
        np.testing.assert_array_equal(ours, tables[key], err_msg=key)


def test_add_noise_and_snr():
    sched = schedules.discrete_schedule("cosine")
    x0, noise = jnp.ones((3, 2, 2, 1)), jnp.full((3, 2, 2, 1), 2.0)
    t = jnp.array([0, 500, 999])
    ab = sched.alphas_cumprod_float64[np.asarray(t)]
    expected = np.sqrt(ab) + 2 * np.sqrt(1 - ab)
    np.testing.assert_allclose(sched.add_noise(x0, noise, t)[:, 0, 0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(sched.snr(t), ab / (1 - ab), rtol=2e-6)


def test_space_timesteps_adm():
    assert schedules.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    # One section of 250 over 1000 (DiT's "250") is diffusers' rounded linspace.
    np.testing.assert_array_equal(schedules.space_timesteps(1000, "250"),
                                  schedules.inference_timesteps(1000, 250, "linspace")[::-1])
    # ADM's docstring example: 300 steps cut in 3 sections strided to 10, 15 and 20 steps.
    kept = schedules.space_timesteps(300, [10, 15, 20])
    assert len(kept) == 45
    assert kept[:10] == list(range(0, 100, 11)) and kept[10] == 100 and kept[24] == 199 and kept[-1] == 299
    with pytest.raises(ValueError, match="section_counts"):
        schedules.space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="section_counts"):
        schedules.space_timesteps(100, [200])


def test_respace_rederives_betas():
    base = schedules.discrete_schedule("linear")
    kept = schedules.space_timesteps(1000, "250")
    spaced = schedules.respace(base, kept)
    assert spaced.num_timesteps == 250 and spaced.time_scale == 1000.0
    np.testing.assert_array_equal(spaced.model_timesteps, kept)
    # The respaced chain has the same marginals at the kept timesteps.
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod_float64[kept], rtol=1e-6)
    assert spaced.betas[0] == base.betas[0] and spaced.betas[1] > base.betas[4]


@pytest.mark.parametrize("call, field", [
    (lambda: schedules.discrete_schedule("sigmoid"), "beta_schedule='sigmoid'.*allowed values: 'linear'"),
    (lambda: schedules.discrete_schedule("cosine", beta_start=0.1), "beta_start"),
    (lambda: schedules.inference_timesteps(1000, 1001), "num_steps"),
    (lambda: schedules.inference_timesteps(1000, 10, "uniform"), "spacing"),
    (lambda: schedules.inference_timesteps(1000, 10, convention="pndm"), "convention"),
    (lambda: schedules.inference_timesteps(1000, 1000, "leading", steps_offset=1), "steps_offset"),
    (lambda: schedules.sample_flow_times(jax.random.key(0), 4, "cosmap"), "distribution"),
    (lambda: schedules.flow_timesteps(10, t_min=0.0), "t_min"),
    (lambda: schedules.time_shift(0.5, 0.0), "shift"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_time_shift_and_resolution_shift():
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(schedules.time_shift(t, 1.0), t)
    assert schedules.time_shift(0.5, 3.0) == pytest.approx(0.75)
    # Flux's exponential shift exp(mu) / (exp(mu) + 1/t - 1) is the same map with shift = exp(mu).
    mu = 0.7
    np.testing.assert_allclose(schedules.time_shift(t[1:], np.exp(mu)), np.exp(mu) / (np.exp(mu) + 1 / t[1:] - 1))
    assert schedules.resolution_shift(1024, 256) == 2.0


def test_flow_timesteps(fixtures_dir):
    grid = schedules.flow_timesteps(10)
    np.testing.assert_allclose(grid, np.linspace(1, 0, 11), atol=1e-15)
    # diffusers' FlowMatchEulerDiscreteScheduler(shift=3), 28 steps: its sigmas.
    sigmas = np.load(fixtures_dir / "samplers_diffusers.npz")["flow_shift3/sigmas"]
    ours = schedules.flow_timesteps(28, shift=3.0, t_min=schedules.time_shift(1 / 1000, 3.0))
    assert _rel(ours, sigmas) <= 1e-6


def test_sample_flow_times():
    key = jax.random.key(0)
    uniform = schedules.sample_flow_times(key, 20000)
    assert uniform.shape == (20000,) and 0 <= float(uniform.min()) and float(uniform.max()) < 1
    assert abs(float(uniform.mean()) - 0.5) < 0.01
    logit_normal = schedules.sample_flow_times(key, 20000, "logit_normal", loc=0.5, scale=0.8)
    logits = np.log(logit_normal) - np.log1p(-np.asarray(logit_normal))
    assert abs(logits.mean() - 0.5) < 0.02 and abs(logits.std() - 0.8) < 0.02
    shifted = schedules.sample_flow_times(key, 20000, "logit_normal", loc=0.5, scale=0.8, shift=3.0)
    np.testing.assert_allclose(shifted, schedules.time_shift(logit_normal, 3.0), rtol=1e-6)


def test_flow_schedule():
    flow = schedules.FlowSchedule(time_scale=1000.0)
    x0, noise = jnp.full((2, 3), 2.0), jnp.full((2, 3), -1.0)
    xt = flow.add_noise(x0, noise, jnp.array([0.0, 0.25]))
    np.testing.assert_allclose(xt, [[2.0] * 3, [1.25] * 3])
    np.testing.assert_allclose(flow.velocity_target(x0, noise), -3.0)
