"""ldm_jax.diffusion.objectives: diffusion / flow / ADM-DiT hybrid losses against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import objectives, schedules

SHAPE = (6, 4, 4, 4)  # [B, h, w, C]


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def schedule():
    return schedules.discrete_schedule("linear", 1000)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1.2, 1.2, SHAPE).astype(np.float32)  # some values beyond ±0.999: edge bins
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 0, 1, 17, 500, 999], np.int32)  # t = 0 (decoder NLL) and t > 0 (KL)
    # A model output that is neither perfect nor wild: ε̂ = ε + error, v ∈ (-1, 1).
    eps = noise + 0.7 * rng.standard_normal(SHAPE).astype(np.float32)
    v = np.tanh(rng.standard_normal(SHAPE)).astype(np.float32)
    return x0, noise, t, np.concatenate([eps, v], axis=-1)


# ---- float64 reference: ADM/DiT gaussian_diffusion.py semantics, written out literally ----------


def _ref_hybrid(model_output, x0, noise, t, num_timesteps=1000, rescaled=False):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    model_output, x0, noise = f(model_output), f(x0), f(noise)
    scale = 1000 / num_timesteps  # get_named_beta_schedule("linear", num_timesteps)
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(ab_prev) / (1.0 - ab)
    coef2 = (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)
    e = lambda arr: arr[t].reshape((-1,) + (1,) * (x0.ndim - 1))  # noqa: E731  _extract_into_tensor
    x_t = e(np.sqrt(ab)) * x0 + e(np.sqrt(1.0 - ab)) * noise  # q_sample
    C = x0.shape[-1]
    eps, var_values = model_output[..., :C], model_output[..., C:]
    # p_mean_variance, LEARNED_RANGE, EPSILON, clip_denoised=False
    min_log, max_log = e(post_log_var_clipped), e(np.log(betas))
    frac = (var_values + 1) / 2
    model_log_var = frac * max_log + (1 - frac) * min_log
    pred_x0 = e(np.sqrt(1.0 / ab)) * x_t - e(np.sqrt(1.0 / ab - 1)) * eps
    model_mean = e(coef1) * pred_x0 + e(coef2) * x_t
    true_mean = e(coef1) * x0 + e(coef2) * x_t
    kl = 0.5 * (-1.0 + model_log_var - min_log + np.exp(min_log - model_log_var)
                + (true_mean - model_mean) ** 2 * np.exp(-model_log_var))
    kl = kl.reshape(len(t), -1).mean(1) / np.log(2.0)
    # discretized_gaussian_log_likelihood
    cdf = lambda z: 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    centered = x0 - model_mean
    inv_std = np.exp(-0.5 * model_log_var)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_probs = np.where(
        x0 < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
        np.where(x0 > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)), np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
    nll = -log_probs.reshape(len(t), -1).mean(1) / np.log(2.0)
    vb = np.where(t == 0, nll, kl)
    if rescaled:  # LossType.RESCALED_MSE
        vb = vb * num_timesteps / 1000.0
    mse = ((noise - eps) ** 2).reshape(len(t), -1).mean(1)
    return {"loss": mse + vb, "mse": mse, "vb": vb}


@pytest.mark.parametrize("rescaled", [False, True], ids=["dit_mse", "adm_rescaled_mse"])
def test_hybrid_loss_matches_float64_adm(schedule, batch, rescaled):
    x0, noise, t, out = batch
    ref = _ref_hybrid(out, x0, noise, t, rescaled=rescaled)
    vb_weight = schedule.num_timesteps / 1000.0 if rescaled else 1.0
    ours = objectives.hybrid_loss(jnp.asarray(out), x0, noise, jnp.asarray(t), schedule,
                                  vb_weight=vb_weight, reduction="none")
    for name in ("loss", "mse", "vb"):
        per_sample_err = np.max(np.abs(np.asarray(ours[name], np.float64) - ref[name]) / np.abs(ref[name]))
        print(f"hybrid {name}: max per-sample relative error {per_sample_err:.2e}")
        assert per_sample_err <= 1e-6, name
    mean = objectives.hybrid_loss(jnp.asarray(out), x0, noise, jnp.asarray(t), schedule, vb_weight=vb_weight)
    assert _rel(mean["loss"], ref["loss"].mean()) <= 1e-6


def test_hybrid_loss_rescaled_weight_uses_num_timesteps(batch):
    """ADM's RESCALED_MSE with 4000 steps multiplies the vb term by 4."""
    x0, noise, t, out = batch
    sched = schedules.discrete_schedule("linear", 4000, beta_start=1e-4 * 0.25, beta_end=0.02 * 0.25)
    t4 = t * 4
    ref = _ref_hybrid(out, x0, noise, t4, num_timesteps=4000, rescaled=True)
    ours = objectives.hybrid_loss(jnp.asarray(out), x0, noise, jnp.asarray(t4), sched, vb_weight=4.0,
                                  reduction="none")
    assert _rel(ours["loss"], ref["loss"]) <= 1e-6


def test_hybrid_loss_vb_trains_only_the_variance(schedule, batch):
    x0, noise, t, out = batch
    vb = lambda o: objectives.hybrid_loss(o, x0, noise, jnp.asarray(t), schedule)["vb"]  # noqa: E731
    vb_grad = jax.grad(vb)(jnp.asarray(out))
    C = x0.shape[-1]
    assert np.all(np.asarray(vb_grad[..., :C]) == 0)  # stop-gradient on the mean
    assert np.all(np.isfinite(vb_grad)) and np.abs(vb_grad[..., C:]).max() > 0
    mse_grad = jax.grad(lambda o: objectives.hybrid_loss(o, x0, noise, jnp.asarray(t), schedule)["loss"])(
        jnp.asarray(out))
    expected = 2.0 * (out[..., :C] - noise) / (np.prod(SHAPE[1:]) * SHAPE[0])
    np.testing.assert_allclose(mse_grad[..., :C], expected, rtol=1e-5, atol=1e-9)


def test_hybrid_loss_rejects_wrong_channels(schedule, batch):
    x0, noise, t, out = batch
    with pytest.raises(ValueError, match="2·C channels"):
        objectives.hybrid_loss(jnp.asarray(out[..., :4]), x0, noise, jnp.asarray(t), schedule)


@pytest.mark.parametrize("prediction_type", objectives.PREDICTION_TYPES)
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_diffusion_loss(schedule, batch, prediction_type, gamma):
    x0, noise, t, out = batch
    pred = out[..., :4]
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t]
    a, s = np.sqrt(ab)[:, None, None, None], np.sqrt(1 - ab)[:, None, None, None]
    target = {"epsilon": noise, "x0": x0, "v": a * noise - s * x0}[prediction_type]
    per_sample = ((pred - target) ** 2).reshape(len(t), -1).mean(1)
    if gamma is not None:
        snr = ab / (1 - ab)
        weight = {"epsilon": np.minimum(snr, gamma) / snr, "v": np.minimum(snr, gamma) / (snr + 1),
                  "x0": np.minimum(snr, gamma)}[prediction_type]
        per_sample = per_sample * weight
    kw = dict(prediction_type=prediction_type, min_snr_gamma=gamma)
    ours = objectives.diffusion_loss(pred, x0, noise, jnp.asarray(t), schedule, reduction="none", **kw)
    assert _rel(ours, per_sample) <= 1e-6
    assert _rel(objectives.diffusion_loss(pred, x0, noise, jnp.asarray(t), schedule, **kw), per_sample.mean()) <= 1e-6


def test_min_snr_weight_at_zero_terminal_snr():
    sched = schedules.discrete_schedule("linear", zero_terminal_snr=True)
    snr = sched.snr(jnp.array([998, 999]))
    assert float(snr[1]) == 0.0
    w = objectives.min_snr_weight(snr, 5.0, "epsilon")
    assert np.all(np.isfinite(w)) and float(w[1]) == 1.0


def test_flow_matching_loss():
    rng = np.random.default_rng(1)
    x0, noise, v = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    ref = ((v - (noise - x0)) ** 2).reshape(SHAPE[0], -1).mean(1)
    assert _rel(objectives.flow_matching_loss(v, x0, noise, reduction="none"), ref) <= 1e-6
    assert _rel(objectives.flow_matching_loss(v, x0, noise), ref.mean()) <= 1e-6
    assert float(objectives.flow_matching_loss(noise - x0, x0, noise)) == 0.0


@pytest.mark.parametrize("call", [
    lambda s, b: objectives.diffusion_loss(b[3][..., :4], b[0], b[1], b[2], s, prediction_type="score"),
    lambda s, b: objectives.diffusion_loss(b[3][..., :4], b[0], b[1], b[2], s, reduction="sum"),
    lambda s, b: objectives.diffusion_loss(b[3][..., :4], b[0], b[1], b[2], s, min_snr_gamma=0.0),
])
def test_bad_options_name_the_field(schedule, batch, call):
    with pytest.raises(ValueError, match="prediction_type|reduction|min_snr_gamma"):
        call(schedule, batch)
