"""KL-VAE weight import/export: diffusers and LDM naming, exact round trip, error reports."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert import vae as convert_vae
from ldm_jax.convert.torch_io import CheckpointMismatchError, load_safetensors, save_safetensors
from ldm_jax.convert.vae import (
    module_from_diffusers_config,
    vae_from_diffusers,
    vae_to_diffusers,
)
from ldm_jax.models.vae import SD_VAE_CONFIG, AutoencoderKL

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    """(folder, module, params) of the tiny diffusers fixture."""
    folder = fixtures_dir / "vae_tiny_diffusers"
    module, params = vae_from_diffusers(folder)
    return folder, module, params


def assert_params_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["tiny", "noquant"])
def test_round_trip_is_exact(fixtures_dir, tmp_path, name):
    module, params = vae_from_diffusers(fixtures_dir / f"vae_{name}_diffusers")
    out = tmp_path / "exported"
    vae_to_diffusers(module, params, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temporary left behind
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * len(module.block_out_channels)
    module_back, params_back = vae_from_diffusers(out)
    assert module_back.to_config() == module.to_config()
    assert_params_equal(params_back, params)
    # The file holds exactly the tensors diffusers saved.
    original = load_safetensors(fixtures_dir / f"vae_{name}_diffusers" / WEIGHTS)
    exported = load_safetensors(out / WEIGHTS)
    assert sorted(exported) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)


def test_export_refuses_to_clobber_and_replaces_with_overwrite(tiny, tmp_path):
    _, module, params = tiny
    out = tmp_path / "vae"
    vae_to_diffusers(module, params, out)
    doubled = jax.tree.map(lambda p: 2 * p, params)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        vae_to_diffusers(module, doubled, out)
    vae_to_diffusers(module, doubled, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
    assert_params_equal(vae_from_diffusers(out)[1], doubled)


def test_interrupted_export_leaves_no_folder(tiny, tmp_path, monkeypatch):
    _, module, params = tiny

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_vae, "save_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        vae_to_diffusers(module, params, tmp_path / "vae")
    assert list(tmp_path.iterdir()) == []


def test_export_checks_params_fit_the_module(tiny, tmp_path):
    _, module, params = tiny
    with pytest.raises(CheckpointMismatchError, match="post_quant_conv.weight"):
        vae_to_diffusers(module.clone(use_post_quant_conv=False), params, tmp_path / "vae")
    assert list(tmp_path.iterdir()) == []


def test_ldm_full_checkpoint_loads_identical_params(tiny, fixtures_dir, tmp_path):
    folder, module, params = tiny
    config = json.loads((folder / "config.json").read_text())
    # Full-SD-style torch checkpoint: {"state_dict": {"first_stage_model.encoder.down.0...": ...}}.
    ldm_module, ldm_params = vae_from_diffusers(fixtures_dir / "vae_tiny_ldm.ckpt", config=config)
    assert ldm_module.to_config() == module.to_config()
    assert_params_equal(ldm_params, params)
    # The same file as the `.bin` of a diffusers-style folder.
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    shutil.copy(fixtures_dir / "vae_tiny_ldm.ckpt", tmp_path / "diffusion_pytorch_model.bin")
    assert_params_equal(vae_from_diffusers(tmp_path)[1], params)


def test_deprecated_diffusers_attention_names_load(tiny, tmp_path):
    folder, module, params = tiny
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state_dict = {}
    for key, value in load_safetensors(folder / WEIGHTS).items():
        for new, old in renames.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state_dict[key] = value
    assert any(".attentions.0.proj_attn." in k for k in state_dict)
    save_safetensors(state_dict, tmp_path / "old.safetensors")
    loaded_module, loaded = vae_from_diffusers(tmp_path / "old.safetensors", config=module)
    assert loaded_module is not module and loaded_module.to_config() == module.to_config()
    assert_params_equal(loaded, params)


def test_single_file_needs_config(tiny):
    folder, _, _ = tiny
    with pytest.raises(ValueError, match="pass `config=`"):
        vae_from_diffusers(folder / WEIGHTS)
    with pytest.raises(FileNotFoundError):
        vae_from_diffusers(folder / "missing.safetensors", config=SD_VAE_CONFIG)


def test_mismatched_state_dict_lists_every_problem(tiny, tmp_path):
    folder, module, _ = tiny
    state_dict = load_safetensors(folder / WEIGHTS)
    del state_dict["decoder.conv_out.bias"]
    state_dict["encoder.extra.weight"] = np.zeros(3, np.float32)
    state_dict["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    save_safetensors(state_dict, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointMismatchError) as error:
        vae_from_diffusers(tmp_path / "bad.safetensors", config=module)
    message = str(error.value)
    assert "missing keys (1)" in message and "decoder.conv_out.bias" in message
    assert "unexpected keys (1)" in message and "encoder.extra.weight" in message
    assert "quant_conv.weight: expected (8, 8, 1, 1), got (8, 8, 3, 3)" in message


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(act_fn="relu"), "act_fn"),
        (
            dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
            "down_block_types",
        ),
        (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types"),
        (dict(_class_name="AutoencoderTiny"), "_class_name"),
        (dict(latents_mean=[0.1, 0.2, 0.3, 0.4]), "latents_mean"),
        (dict(norm_num_groups=3), "norm_num_groups"),
        (dict(num_heads=2), "num_heads"),
    ],
)
def test_unsupported_diffusers_config_raises_naming_field(tiny, change, field):
    folder, _, _ = tiny
    config = {**json.loads((folder / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=field):
        module_from_diffusers_config(config)


def test_module_kwargs_set_compute_dtype(tiny):
    folder, _, params = tiny
    module, loaded = vae_from_diffusers(folder, dtype=jnp.bfloat16)
    assert isinstance(module, AutoencoderKL) and module.dtype == jnp.bfloat16
    assert_params_equal(loaded, params)
