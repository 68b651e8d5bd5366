"""PatchGAN discriminator: parity with taming's NLayerDiscriminator (BatchNorm, GroupNorm, none),
BatchNorm state handling, init, logical names, config errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert.torch_io import load_state_dict
from ldm_jax.models.discriminator import NLayerDiscriminator, apply_discriminator
from ldm_jax.parallel.partitioning import LOGICAL_AXIS_RULES

N_LAYERS, NDF, GROUPS = 2, 8, 4  # as tools/fixtures/lpips.py


def rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def from_taming(sd, n_layers, norm):
    """(params, state) from a taming `NLayerDiscriminator` state dict: conv k at main.{3k-1}."""
    params, state = {}, {}
    for k in range(n_layers + 2):
        t = 0 if k == 0 else 3 * k - 1
        params[f"conv_{k}"] = {"kernel": np.transpose(sd[f"main.{t}.weight"], (2, 3, 1, 0))}
        if f"main.{t}.bias" in sd:
            params[f"conv_{k}"]["bias"] = sd[f"main.{t}.bias"]
        if 1 <= k <= n_layers and norm != "none":
            params[f"norm_{k}"] = {"scale": sd[f"main.{3 * k}.weight"], "bias": sd[f"main.{3 * k}.bias"]}
        if 1 <= k <= n_layers and norm == "batch":
            stats = {"mean": sd[f"main.{3 * k}.running_mean"], "var": sd[f"main.{3 * k}.running_var"]}
            state.setdefault("batch_stats", {})[f"norm_{k}"] = stats
    return params, state


@pytest.fixture(scope="module")
def io(fixtures_dir):
    return np.load(fixtures_dir / "patchgan_io.npz")


def load(fixtures_dir, norm):
    module = NLayerDiscriminator(ndf=NDF, n_layers=N_LAYERS, norm=norm, norm_groups=GROUPS)
    params, state = from_taming(load_state_dict(fixtures_dir / f"patchgan_{norm}.pt"), N_LAYERS, norm)
    init = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    init = nn.unbox(init)
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, {"params": params, **state})
    return module, params, state


@pytest.mark.parametrize("norm", ["group", "none"])
def test_matches_taming_reference(fixtures_dir, io, norm):
    module, params, state = load(fixtures_dir, norm)
    logits, new_state = jax.jit(apply_discriminator, static_argnums=0)(module, params, state, io["x"])
    assert logits.shape == (4, 6, 6, 1) and new_state == {}
    assert rel_err(logits, io[f"{norm}_logits"]) <= 1e-5


def test_batchnorm_matches_taming_train_and_eval(fixtures_dir, io):
    module, params, state = load(fixtures_dir, "batch")
    apply = jax.jit(apply_discriminator, static_argnums=(0, 4))
    logits, new_state = apply(module, params, state, io["x"], True)
    assert rel_err(logits, io["batch_logits"]) <= 1e-5
    for k in (1, 2):  # running averages after one training forward (unbiased variance, momentum 0.1)
        stats = new_state["batch_stats"][f"norm_{k}"]
        assert rel_err(stats["mean"], io[f"batch_main.{3 * k}.running_mean"]) <= 1e-5
        assert rel_err(stats["var"], io[f"batch_main.{3 * k}.running_var"]) <= 1e-5
    eval_logits, eval_state = apply(module, params, new_state, io["x"], False)
    assert rel_err(eval_logits, io["batch_logits_eval"]) <= 1e-5
    jax.tree.map(np.testing.assert_array_equal, eval_state, new_state)  # eval leaves the state alone


def test_patch_grid_names_and_init():
    module = NLayerDiscriminator()  # taming's ndf 64, n_layers 3; GroupNorm(32)
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    out = jax.eval_shape(lambda v, x: module.apply(nn.unbox(v), x), boxed, jnp.zeros((2, 256, 256, 3)))
    assert out.shape == (2, 30, 30, 1)

    vocabulary = {name for name, _ in LOGICAL_AXIS_RULES}
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= vocabulary

    bn = NLayerDiscriminator(ndf=16, n_layers=2, norm="batch")
    variables = nn.unbox(jax.jit(bn.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3))))
    kernel = np.asarray(variables["params"]["conv_2"]["kernel"])  # 4*4*32*64 values
    assert abs(kernel.std() - 0.02) < 0.001 and abs(kernel.mean()) < 0.001
    assert "bias" not in variables["params"]["conv_2"]  # bias-free before BatchNorm, as taming
    bias = np.asarray(variables["params"]["conv_0"]["bias"])  # torch default U(+-1/sqrt(48))
    assert np.all(np.abs(bias) <= 1 / np.sqrt(48)) and bias.std() > 0.03
    scale = np.asarray(variables["params"]["norm_2"]["scale"])
    assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03
    np.testing.assert_array_equal(variables["batch_stats"]["norm_2"]["var"], np.ones(64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm="layer"), r"norm='layer': allowed values are \('group', 'batch', 'none'\)"),
        (dict(ndf=8, norm_groups=32), r"norm_groups=32 does not divide"),
        (dict(n_layers=0), r"n_layers=0 must be a positive int"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NLayerDiscriminator(**kwargs)
