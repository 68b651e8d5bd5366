"""DiT weight import from official facebookresearch checkpoints and diffusers folders.

Checked against the golden outputs of tools/fixtures/dit.py (tiny models, every parameter random).
"""

import json
import shutil

import jax
import numpy as np
import pytest

from ldm_jax.convert.dit import dit_config_from_diffusers, dit_from_diffusers, dit_from_official
from ldm_jax.convert.torch_io import (
    CheckpointMismatchError,
    load_state_dict,
    load_safetensors,
    save_safetensors,
)

# The tiny official fixture is DiT-S/2's recipe shrunk: 64px images -> 8x8 latents.
TINY_OFFICIAL = dict(
    model="DiT-S/2", image_size=64, num_classes=10, hidden_size=32, depth=2, num_heads=4
)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def run(module, params, golden):
    return jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))(
        params, golden["x"], golden["t"], golden["y"]
    )


@pytest.fixture(scope="module")
def official(fixtures_dir):
    return dit_from_official(fixtures_dir / "dit_tiny_official.pt", **TINY_OFFICIAL)


@pytest.fixture(scope="module")
def diffusers(fixtures_dir):
    return dit_from_diffusers(fixtures_dir / "dit_tiny_diffusers")


def assert_same_params(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- official


def test_official_matches_reference(official, fixtures_dir):
    module, params = official
    golden = np.load(fixtures_dir / "dit_tiny_official.npz")
    assert golden["y"][-1] == module.num_classes  # the null class is exercised
    assert (module.timestep_freq_shift, module.mlp_norm_eps) == (0.0, 1e-6)
    err = rel_err(run(module, params, golden), golden["out"])
    print(f"official DiT fp32 max rel err {err:.2e}")
    assert err <= 1e-5


def test_official_training_checkpoint(official, fixtures_dir):
    path = fixtures_dir / "dit_tiny_official_train.pt"
    _, ema = dit_from_official(path, **TINY_OFFICIAL)
    assert_same_params(ema, official[1])  # 'ema' is preferred, and holds the plain weights
    _, raw = dit_from_official(path, weights="model", **TINY_OFFICIAL)
    diff = raw["blocks_0"]["attn"]["qkv"]["kernel"] - ema["blocks_0"]["attn"]["qkv"]["kernel"]
    assert 0 < np.max(np.abs(diff)) < 0.1
    with pytest.raises(ValueError, match="weights='last'"):
        dit_from_official(path, weights="last", **TINY_OFFICIAL)


def test_official_mismatch_lists_every_problem(fixtures_dir, tmp_path):
    state = load_state_dict(fixtures_dir / "dit_tiny_official.pt")
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.q_norm.weight"] = np.ones(8, np.float32)
    state["y_embedder.embedding_table.weight"] = np.zeros((10, 32), np.float32)  # no null row
    save_safetensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointMismatchError) as info:
        dit_from_official(tmp_path / "bad.safetensors", **TINY_OFFICIAL)
    message = str(info.value)
    for expected in (
        "missing keys (1)",
        "blocks.1.mlp.fc2.bias",
        "unexpected keys (1)",
        "blocks.0.attn.q_norm.weight",
        "wrong shapes (1)",
        "y_embedder.embedding_table.weight: expected (11, 32), got (10, 32)",
    ):
        assert expected in message


def test_official_rejects_foreign_pos_embed(fixtures_dir, tmp_path):
    state = load_state_dict(fixtures_dir / "dit_tiny_official.pt")
    state["pos_embed"] = state["pos_embed"][:, ::-1].copy()  # another token order
    save_safetensors(state, tmp_path / "flipped.safetensors")
    with pytest.raises(ValueError, match="pos_embed"):
        dit_from_official(tmp_path / "flipped.safetensors", **TINY_OFFICIAL)


def test_official_config_errors(fixtures_dir):
    with pytest.raises(ValueError, match="image_size=60"):
        dit_from_official(fixtures_dir / "dit_tiny_official.pt", image_size=60)
    with pytest.raises(ValueError, match="qk_norm"):
        dit_from_official(fixtures_dir / "dit_tiny_official.pt", qk_norm=True, **TINY_OFFICIAL)


# ----------------------------------------------------------------------------- diffusers


def test_diffusers_matches_reference(diffusers, fixtures_dir):
    module, params = diffusers
    golden = np.load(fixtures_dir / "dit_tiny_diffusers.npz")
    assert (module.timestep_freq_shift, module.mlp_norm_eps) == (1.0, 1e-5)
    assert (module.hidden_size, module.depth, module.num_heads, module.learn_sigma) == (
        32,
        2,
        4,
        True,
    )
    err = rel_err(run(module, params, golden), golden["out"])
    print(f"diffusers DiT fp32 max rel err {err:.2e}")
    assert err <= 1e-5


def test_original_semantics_do_not_fit_diffusers(fixtures_dir):
    """The frequency divisor is a real difference: original semantics miss diffusers' output."""
    module, params = dit_from_diffusers(
        fixtures_dir / "dit_tiny_diffusers", timestep_freq_shift=0.0
    )
    golden = np.load(fixtures_dir / "dit_tiny_diffusers.npz")
    assert rel_err(run(module, params, golden), golden["out"]) > 1e-3


def test_diffusers_pipeline_folder_and_differing_embedders(diffusers, fixtures_dir, tmp_path):
    pipeline = tmp_path / "pipeline"
    shutil.copytree(fixtures_dir / "dit_tiny_diffusers", pipeline / "transformer")
    _, params = dit_from_diffusers(pipeline)  # finds transformer/
    assert_same_params(params, diffusers[1])

    weights = pipeline / "transformer" / DIFFUSERS_WEIGHTS
    state = load_safetensors(weights)
    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    state[key] = state[key] + 1.0
    save_safetensors(state, weights)
    with pytest.raises(ValueError, match=f"differ between blocks.*{key}"):
        dit_from_diffusers(pipeline)


def test_diffusers_mismatch_lists_every_problem(fixtures_dir, tmp_path):
    folder = tmp_path / "dit"
    shutil.copytree(fixtures_dir / "dit_tiny_diffusers", folder)
    state = load_safetensors(folder / DIFFUSERS_WEIGHTS)
    del state["transformer_blocks.0.attn1.to_k.bias"]
    state["transformer_blocks.1.ff.net.2.weight"] = state["transformer_blocks.1.ff.net.2.weight"][
        :, :64
    ]
    save_safetensors(state, folder / DIFFUSERS_WEIGHTS)
    with pytest.raises(CheckpointMismatchError) as info:
        dit_from_diffusers(folder)
    assert "transformer_blocks.0.attn1.to_k.bias" in str(info.value)
    assert "transformer_blocks.1.ff.net.2.weight: expected (32, 128), got (32, 64)" in str(
        info.value
    )


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(norm_type="ada_norm_single"), "norm_type='ada_norm_single'"),
        (dict(activation_fn="geglu"), "activation_fn='geglu'"),
        (dict(out_channels=6), "out_channels=6"),
        (dict(_class_name="UNet2DModel"), "_class_name='UNet2DModel'"),
    ],
)
def test_diffusers_config_errors_name_the_field(fixtures_dir, change, field):
    config = json.loads((fixtures_dir / "dit_tiny_diffusers" / "config.json").read_text())
    with pytest.raises(ValueError, match=field):
        dit_config_from_diffusers({**config, **change})


def test_diffusers_config_learn_sigma(fixtures_dir):
    config = json.loads((fixtures_dir / "dit_tiny_diffusers" / "config.json").read_text())
    assert dit_config_from_diffusers(config)["learn_sigma"] is True
    assert dit_config_from_diffusers({**config, "out_channels": None})["learn_sigma"] is False
