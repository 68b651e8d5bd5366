"""Model bundles on disk: module config as JSON, params as orbax."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import serialization
from ldm_jax.models.vae import AutoencoderKL


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
