"""LPIPS-VGG: parity with the lpips package's computation (random tiny VGG), the torch-file converter,
the switch-off helper, and safe gradients."""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert import lpips as convert
from ldm_jax.convert.torch_io import CheckpointMismatchError, load_state_dict, save_safetensors
from ldm_jax.models.lpips import LPIPS, VGG16_WIDTHS
from ldm_jax.parallel.partitioning import LOGICAL_AXIS_RULES

WIDTHS = (4, 8, 16, 32, 32)  # as tools/fixtures/lpips.py


@pytest.fixture(scope="module")
def loaded(fixtures_dir):
    module, params = convert.lpips_from_torch(
        fixtures_dir / "lpips_vgg16.pth", fixtures_dir / "lpips_lins.pth", widths=WIDTHS
    )
    return module, params


@pytest.fixture(scope="module")
def io(fixtures_dir):
    return np.load(fixtures_dir / "lpips_io.npz")


def test_matches_lpips_reference(loaded, io):
    module, params = loaded
    out = np.asarray(jax.jit(module.apply)({"params": params}, io["x"], io["y"]))
    assert out.shape == (2,)
    assert np.max(np.abs(out - io["lpips"])) / np.max(np.abs(io["lpips"])) <= 1e-5


def test_split_path_identity_and_symmetry(loaded, io):
    module, params = loaded
    x, y = jnp.asarray(io["x"]), jnp.asarray(io["y"])

    @jax.jit
    def run(params):
        variables = {"params": params}
        split = module.apply(variables, module.apply(variables, x, method=LPIPS.features),
                             module.apply(variables, y, method=LPIPS.features), method=LPIPS.distance)
        return split, module.apply(variables, y, x), module.apply(variables, x, x)

    split, swapped, same = run(params)
    np.testing.assert_allclose(split, io["lpips"], rtol=1e-5)
    np.testing.assert_allclose(swapped, io["lpips"], rtol=1e-5)
    assert np.all(np.abs(same) < 1e-10)  # zero up to the rounding of different batch rows


@pytest.mark.slow
def test_gradient_finite_where_features_vanish(loaded, io):
    module, params = loaded
    dead = {**params, "features_0": {**params["features_0"], "bias": jnp.full((WIDTHS[0],), -1e3)}}
    grad = jax.jit(jax.grad(lambda y: module.apply({"params": dead}, io["x"], y).sum()))(io["y"])
    assert np.all(np.isfinite(grad))
    assert np.all(np.abs(module.apply({"params": dead}, io["x"], io["y"])) < 1e-10)


def test_default_widths_are_vgg16():
    """Full-size keys/shapes (as vgg16-397923af.pth and lpips' vgg.pth) convert onto LPIPS()."""
    vgg_shapes, lin_shapes = convert._expected_shapes(VGG16_WIDTHS)
    assert vgg_shapes["features.0.weight"] == (64, 3, 3, 3)
    assert vgg_shapes["features.28.weight"] == (512, 512, 3, 3) and len(vgg_shapes) == 26
    assert lin_shapes == {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(VGG16_WIDTHS)}
    vgg = {k: np.zeros(s, np.float32) for k, s in vgg_shapes.items()}
    vgg["classifier.6.weight"] = np.zeros((1000, 4096), np.float32)  # ignored
    params = convert.lpips_params_from_state_dicts(vgg, {k: np.zeros(s, np.float32) for k, s in lin_shapes.items()})
    boxed = jax.eval_shape(LPIPS().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)))
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, nn.unbox(boxed)["params"])
    vocabulary = {name for name, _ in LOGICAL_AXIS_RULES}
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned) and set(leaf.names) <= vocabulary
        assert len(leaf.names) == len(leaf.value.shape)


def test_converter_lists_every_problem(fixtures_dir, tmp_path):
    vgg = dict(load_state_dict(fixtures_dir / "lpips_vgg16.pth"))
    lins = dict(load_state_dict(fixtures_dir / "lpips_lins.pth"))
    del vgg["features.7.bias"]
    vgg["features.30.weight"] = np.zeros((1,), np.float32)
    lins["lin2.model.1.weight"] = np.zeros((1, 3, 1, 1), np.float32)
    save_safetensors(vgg, tmp_path / "vgg.safetensors")
    save_safetensors(lins, tmp_path / "lins.safetensors")
    with pytest.raises(CheckpointMismatchError) as error:
        convert.lpips_from_torch(tmp_path / "vgg.safetensors", tmp_path / "lins.safetensors", widths=WIDTHS)
    message = str(error.value)
    assert "features.7.bias" in message and "features.30.weight" in message
    assert "lins:lin2.model.1.weight: expected (1, 16, 1, 1), got (1, 3, 1, 1)" in message


def test_load_lpips_or_none(fixtures_dir, tmp_path, caplog):
    vgg = str(fixtures_dir / "lpips_vgg16.pth")
    with caplog.at_level(logging.WARNING):
        assert convert.load_lpips_or_none({"lpips_vgg_path": vgg}) is None
    assert "LPIPS perceptual loss is OFF" in caplog.text and "lpips_lins_path is not set" in caplog.text
    caplog.clear()
    missing = str(tmp_path / "vgg.pth")
    with caplog.at_level(logging.WARNING):
        assert convert.load_lpips_or_none({"lpips_vgg_path": vgg, "lpips_lins_path": missing}) is None
    assert f"lpips_lins_path={missing!r}: file not found" in caplog.text
    # Real files: the full-width network is built, so the tiny fixture does not fit (an error, not None).
    with pytest.raises(CheckpointMismatchError, match="features.28.weight: expected"):
        convert.load_lpips_or_none({"lpips_vgg_path": vgg, "lpips_lins_path": str(fixtures_dir / "lpips_lins.pth")})
