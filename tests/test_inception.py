"""The FID InceptionV3 and its pytorch-fid converter against the plain-torch reference.

Fixtures come from tools/fixtures/inception.py (pytorch-fid's network rebuilt in torch.nn, widths
/ 16, a 63-way fc, random weights and BatchNorm statistics).
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert import inception as convert
from ldm_jax.convert.torch_io import CheckpointMismatchError, load_state_dict, save_safetensors
from ldm_jax.models import inception
from ldm_jax.parallel.partitioning import LOGICAL_AXIS_RULES

TINY = dict(width_divisor=16, num_classes=63)


def max_rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def io(fixtures_dir):
    return dict(np.load(fixtures_dir / "inception_fid_tiny_io.npz"))


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return convert.inception_from_pytorch_fid(fixtures_dir / "inception_fid_tiny.pth", **TINY)


@pytest.fixture(scope="module")
def tiny_outputs(tiny, io):
    module, params = tiny
    return jax.jit(module.apply)({"params": params}, io["images"])


@pytest.mark.parametrize("case", ["up", "down"])
def test_resize_matches_torch_bilinear(io, case):
    x, ref = io[f"resize_{case}_in"], io[f"resize_{case}_out"]
    out = inception.resize_bilinear(jnp.asarray(x), ref.shape[1:3])
    assert out.shape == ref.shape
    assert max_rel_err(out, ref) <= 1e-6  # torch's weights reproduced to the bit; sums to 1 ulp
    np.testing.assert_array_equal(inception.resize_bilinear(jnp.asarray(x), x.shape[1:3]), x)


@pytest.mark.parametrize("key", ["pool", "spatial", "logits_unbiased"])
def test_outputs_match_pytorch_fid_reference(tiny_outputs, io, key):
    assert tiny_outputs[key].shape == io[key].shape
    assert tiny_outputs[key].dtype == jnp.float32
    # Measured: pool 1.4e-5, spatial 1.1e-5, logits 6e-6. The random 94-conv network amplifies
    # rounding: torch's own float32 pool differs from its float64 pool by 9e-5.
    assert max_rel_err(tiny_outputs[key], io[key]) <= 1e-4


def test_inputs_change_outputs(tiny_outputs):
    pool = np.asarray(tiny_outputs["pool"])
    assert np.abs(pool[0] - pool[1]).mean() > 0.05 * np.abs(pool).mean()


def test_full_width_architecture_matches_pytorch_fid(fixtures_dir):
    ref = json.loads((fixtures_dir / "inception_fid_shapes.json").read_text())
    torch_shapes = {
        k: tuple(v) for k, v in ref["state_dict_shapes"].items() if not k.endswith("num_batches_tracked")
    }
    module = inception.InceptionV3()
    expected = convert.expected_state_dict_shapes(module)
    assert expected == torch_shapes
    running = sum(np.prod(s) for k, s in expected.items() if k.endswith(("running_mean", "running_var")))
    assert sum(np.prod(s) for s in expected.values()) - running == ref["num_parameters"] == 23_850_960
    out = jax.eval_shape(
        module.apply, {"params": convert.param_shapes(module)}, jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    )
    assert {k: v.shape for k, v in out.items()} == {
        "pool": (2, 2048), "spatial": (2, 17 * 17 * 7), "logits_unbiased": (2, 1008)
    }


def test_params_carry_logical_axis_names():
    boxed = jax.eval_shape(inception.InceptionV3(**TINY).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    vocabulary = {name for name, _ in LOGICAL_AXIS_RULES}
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    assert all(len(leaf.names) == leaf.value.ndim and set(leaf.names) <= vocabulary for leaf in leaves)


def test_safetensors_without_num_batches_tracked_converts_the_same(tiny, fixtures_dir, tmp_path):
    """pytorch-fid's published file predates `num_batches_tracked`; both layouts load."""
    state = load_state_dict(fixtures_dir / "inception_fid_tiny.pth")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    save_safetensors(state, tmp_path / "fid.safetensors")
    _, params = convert.inception_from_pytorch_fid(tmp_path / "fid.safetensors", **TINY)
    jax.tree.map(np.testing.assert_array_equal, params, tiny[1])


def test_converter_lists_every_mismatch(fixtures_dir, tmp_path):
    state = load_state_dict(fixtures_dir / "inception_fid_tiny.pth")
    del state["Mixed_7c.branch_pool.bn.running_var"]
    state["AuxLogits.fc.weight"] = np.zeros((63, 48), np.float32)
    state["fc.weight"] = np.zeros((1008, 128), np.float32)
    save_safetensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        convert.inception_from_pytorch_fid(tmp_path / "bad.safetensors", **TINY)
    message = str(err.value)
    for part in ("Mixed_7c.branch_pool.bn.running_var", "AuxLogits.fc.weight", "fc.weight: expected (63, 128)"):
        assert part in message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width_divisor=3), "width_divisor=3"),
        (dict(image_size=64), "image_size=64"),
        (dict(num_classes=0), "num_classes=0"),
    ],
)
def test_invalid_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        inception.InceptionV3(**kwargs)


def test_wrong_image_shape_is_rejected(tiny):
    module, params = tiny
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        module.apply({"params": params}, jnp.zeros((1, 3, 32, 32)))
