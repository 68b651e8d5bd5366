"""AutoencoderKL: parity with diffusers, posterior semantics, config checks, logical axis names."""

import functools
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert.torch_io import load_safetensors
from ldm_jax.convert.vae import vae_from_diffusers
from ldm_jax.models.conv_blocks import CONV_KERNEL_AXES
from ldm_jax.models.vae import (
    SD_VAE_CONFIG,
    AutoencoderKL,
    DiagonalGaussian,
    scale_latents,
    unscale_latents,
)
from ldm_jax.parallel.partitioning import LOGICAL_AXIS_RULES

TOLERANCE = 1e-5
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def max_rel_err(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=["tiny", "noquant"])
def ref(request, fixtures_dir):
    """A fixture model, its golden diffusers outputs and ours (one jitted call)."""
    module, params = vae_from_diffusers(fixtures_dir / f"vae_{request.param}_diffusers")
    golden = dict(np.load(fixtures_dir / f"vae_{request.param}.npz"))

    @jax.jit
    def run(params, x, z):
        apply = functools.partial(module.apply, {"params": params})
        return apply(x, method=module.encode), apply(z, method=module.decode), apply(x)[0]

    posterior, decoded, reconstruction = run(params, golden["x"], golden["z"])
    ours = dict(posterior=posterior, decoded=decoded, reconstruction=reconstruction)
    return types.SimpleNamespace(name=request.param, golden=golden, ours=ours)


def test_encode_matches_diffusers(ref):
    posterior = ref.ours["posterior"]
    errors = {
        "mean": max_rel_err(posterior.mean, ref.golden["mean"]),
        "logvar": max_rel_err(posterior.logvar, ref.golden["logvar"]),
        "kl": max_rel_err(posterior.kl(), ref.golden["kl"]),
        "nll": max_rel_err(posterior.nll(ref.golden["sample"]), ref.golden["nll"]),
    }
    print(ref.name, "encode max rel err", errors)
    assert max(errors.values()) <= TOLERANCE, errors


def test_decode_and_reconstruction_match_diffusers(ref):
    errors = {
        name: max_rel_err(ref.ours[name], ref.golden[name])
        for name in ("decoded", "reconstruction")
    }
    print(ref.name, "decode max rel err", errors)
    assert max(errors.values()) <= TOLERANCE, errors


def test_sample_is_mean_plus_std_times_key_noise(ref):
    golden = ref.golden
    posterior = DiagonalGaussian(
        mean=jnp.asarray(golden["mean"]), logvar=jnp.asarray(golden["logvar"])
    )
    # diffusers' std, from its sample with known noise.
    np.testing.assert_allclose(
        posterior.mean + posterior.std * golden["eps"], golden["sample"], rtol=1e-6, atol=1e-6
    )
    key = jax.random.key(3)
    expected = posterior.mean + jnp.exp(0.5 * posterior.logvar) * jax.random.normal(
        key, posterior.mean.shape
    )
    np.testing.assert_array_equal(posterior.sample(key), expected)
    assert not np.allclose(posterior.sample(jax.random.key(4)), expected)


def test_call_decodes_a_posterior_sample(fixtures_dir):
    module, params = vae_from_diffusers(fixtures_dir / "vae_tiny_diffusers")
    x = np.load(fixtures_dir / "vae_tiny.npz")["x"]
    key = jax.random.key(0)

    @jax.jit
    def run(params):
        reconstruction, posterior = module.apply({"params": params}, x, key)
        expected = module.apply({"params": params}, posterior.sample(key), method=module.decode)
        return reconstruction, expected

    reconstruction, expected = run(params)
    assert reconstruction.shape == x.shape
    assert max_rel_err(reconstruction, expected) <= TOLERANCE


# ----------------------------------------------------------------------------- posterior


def test_posterior_clamps_logvar_and_computes_kl():
    mean = jnp.array([[[[0.5, -1.0]]], [[[2.0, 0.0]]]])  # [2, 1, 1, 2]
    logvar = jnp.array([[[[-100.0, 0.3]]], [[[100.0, -0.7]]]])
    posterior = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=-1))
    clamped = np.array([[[[-30.0, 0.3]]], [[[20.0, -0.7]]]], np.float32)
    np.testing.assert_array_equal(posterior.logvar, clamped)
    np.testing.assert_array_equal(posterior.mode(), mean)
    m, lv = np.asarray(mean, np.float64), clamped.astype(np.float64)
    expected_kl = 0.5 * np.sum(m**2 + np.exp(lv) - 1.0 - lv, axis=(1, 2, 3))
    np.testing.assert_allclose(posterior.kl(), expected_kl, rtol=1e-6)
    np.testing.assert_allclose(posterior.kl(posterior), np.zeros(2), atol=1e-6)
    other = DiagonalGaussian(mean=mean + 1.0, logvar=jnp.zeros_like(mean))
    expected_cross = 0.5 * np.sum(1.0 + np.exp(lv) - 1.0 - lv, axis=(1, 2, 3))
    np.testing.assert_allclose(posterior.kl(other), expected_cross, rtol=1e-6)
    # A pytree: goes through jit whole.
    doubled = jax.jit(lambda p: jax.tree.map(lambda a: 2 * a, p))(posterior)
    np.testing.assert_array_equal(doubled.mean, 2 * mean)


def test_scale_and_unscale_latents_invert_each_other():
    z = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(scale_latents(z, 0.5, 0.1), (z - 0.1) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(scale_latents(z, 0.18215), z * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(
        unscale_latents(scale_latents(z, 1.5305, 0.0609), 1.5305, 0.0609), z, rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(block_out_channels=()), "block_out_channels"),
        (dict(block_out_channels=(8, -16)), "block_out_channels"),
        (dict(block_out_channels=(8, 12), norm_num_groups=8), "norm_num_groups"),
        (dict(norm_num_groups=0), "norm_num_groups"),
        (dict(layers_per_block=0), "layers_per_block"),
        (dict(latent_channels=0), "latent_channels"),
        (dict(in_channels=2.5), "in_channels"),
        (dict(scaling_factor=0.0), "scaling_factor"),
        (dict(shift_factor=float("nan")), "shift_factor"),
    ],
)
def test_bad_config_raises_naming_field(overrides, field):
    with pytest.raises(ValueError, match=f"AutoencoderKL.{field}="):
        AutoencoderKL(**{**TINY, **overrides})


def test_from_config_rejects_unknown_fields_and_round_trips():
    with pytest.raises(ValueError, match="unknown fields.*'num_layers'"):
        AutoencoderKL.from_config({**TINY, "num_layers": 2})
    module = AutoencoderKL.from_config(
        {**SD_VAE_CONFIG, "block_out_channels": [128, 256, 512, 512]}
    )
    assert module.to_config() == dict(SD_VAE_CONFIG)
    assert AutoencoderKL.from_config(module.to_config(), dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_bad_inputs_raise_naming_field():
    module = AutoencoderKL(**TINY)
    with pytest.raises(ValueError, match="AutoencoderKL.in_channels=3 but x has 4 channels"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 4)))
    with pytest.raises(ValueError, match="15x16 is not divisible by the downsampling factor 2"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 15, 16, 3)))
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="AutoencoderKL.latent_channels=4 but z has 3 channels"):
        jax.eval_shape(
            lambda v, z: module.apply(v, z, method=module.decode),
            variables,
            jnp.zeros((1, 8, 8, 3)),
        )


def test_sd_preset_shapes_and_parameter_count():
    module = AutoencoderKL.from_config(SD_VAE_CONFIG)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    params = nn.unbox(variables["params"])
    # diffusers' AutoencoderKL with this config (stabilityai/sd-vae-ft-ema): 83,653,863 parameters.
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == 83_653_863
    posterior = jax.eval_shape(lambda v, x: module.apply(v, x, method=module.encode), variables, x)
    assert posterior.mean.shape == (1, 8, 8, 4) and posterior.mean.dtype == jnp.float32


def test_every_param_has_logical_names_from_the_rules_table(fixtures_dir):
    module = AutoencoderKL(**TINY)  # the config of the vae_tiny fixture
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    vocabulary = {name for name, _ in LOGICAL_AXIS_RULES}
    assert len(leaves) == len(
        load_safetensors(fixtures_dir / "vae_tiny_diffusers/diffusion_pytorch_model.safetensors")
    )
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), where
        assert len(leaf.names) == len(leaf.value.shape), where
        assert set(leaf.names) <= vocabulary, where
        if leaf.value.ndim == 4:
            assert leaf.names == CONV_KERNEL_AXES, where


# ----------------------------------------------------------------------------- remat, dtype


def test_remat_recomputes_every_resnet_and_keeps_outputs(fixtures_dir):
    module, params = vae_from_diffusers(fixtures_dir / "vae_tiny_diffusers", remat=True)
    golden = np.load(fixtures_dir / "vae_tiny.npz")
    decode = lambda p, z: module.apply({"params": p}, z, method=module.decode)  # noqa: E731
    assert max_rel_err(jax.jit(decode)(params, golden["z"]), golden["decoded"]) <= TOLERANCE
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(decode(p, golden["z"]))))(params))
    resnets = 2 + len(module.block_out_channels) * (module.layers_per_block + 1)  # mid + up blocks
    assert len(re.findall(r"\b(?:remat2|checkpoint)\[", jaxpr)) == resnets


def test_bf16_compute_dtype(fixtures_dir):
    module, params = vae_from_diffusers(fixtures_dir / "vae_tiny_diffusers", dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    golden = np.load(fixtures_dir / "vae_tiny.npz")
    posterior, decoded = jax.jit(
        lambda p: (
            module.apply({"params": p}, golden["x"], method=module.encode),
            module.apply({"params": p}, golden["z"], method=module.decode),
        )
    )(params)
    assert decoded.dtype == jnp.bfloat16 and posterior.mean.dtype == jnp.float32
    assert max_rel_err(decoded.astype(jnp.float32), golden["decoded"]) < 5e-2
    assert max_rel_err(posterior.mean, golden["mean"]) < 5e-2
