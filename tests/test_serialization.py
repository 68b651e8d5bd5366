"""Model bundles on disk, and the `ldm-jax convert` command that writes them."""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert.dit import dit_from_diffusers
from ldm_jax.models import serialization
from ldm_jax.models.vae import AutoencoderKL

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bundle_round_trip_keeps_module_and_params(tmp_path):
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, dtype=jnp.bfloat16,
                        scaling_factor=0.5)
    params = jax.tree_util.tree_map(
        lambda x: np.asarray(x), serialization.nn.unbox(jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
    )
    serialization.save_model(tmp_path / "vae", vae, params, metadata={"note": "x"})
    assert not (tmp_path / "vae.tmp").exists()
    loaded, loaded_params, metadata = serialization.load_model(tmp_path / "vae")
    assert loaded == vae and metadata == {"note": "x"}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded_params, params)
    spec = json.loads((tmp_path / "vae" / "model.json").read_text())
    assert spec["class"] == "AutoencoderKL" and spec["config"]["dtype"] == {"dtype": "bfloat16"}


def test_missing_bundle_and_unknown_class(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model bundle"):
        serialization.load_model(tmp_path)
    with pytest.raises(ValueError, match="'UNet' is not known"):
        serialization.module_from_config({"class": "UNet", "config": {}})


def test_convert_command_writes_a_loadable_bundle(tmp_path, fixtures_dir):
    out = tmp_path / "dit"
    result = subprocess.run(
        [sys.executable, "-m", "ldm_jax.cli", "convert", "--from=dit_diffusers",
         f"--src={fixtures_dir / 'dit_tiny_diffusers'}", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote DiT bundle" in result.stdout
    module, params, metadata = serialization.load_model(out)
    reference_module, reference_params = dit_from_diffusers(fixtures_dir / "dit_tiny_diffusers")
    assert module == reference_module and metadata["format"] == "dit_diffusers"
    data = np.load(fixtures_dir / "dit_tiny_diffusers.npz")
    x = jnp.asarray(data["x"])
    out_a = module.apply({"params": params}, x, jnp.asarray(data["t"]), jnp.asarray(data["y"]))
    out_b = reference_module.apply({"params": reference_params}, x, jnp.asarray(data["t"]), jnp.asarray(data["y"]))
    np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))


def test_convert_command_reports_missing_flags():
    result = subprocess.run([sys.executable, "-m", "ldm_jax.cli", "convert", "--from=dit_official"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "--src" in result.stderr and "--out" in result.stderr
