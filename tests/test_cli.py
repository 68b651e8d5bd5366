"""The `ldm-jax` commands as users run them (real subprocesses): convert and encode."""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.dit import dit_from_diffusers
from ldm_jax.data import sources
from ldm_jax.data.transforms import center_crop_arr, to_pil_rgb, to_unit_range
from ldm_jax.models import serialization
from ldm_jax.models.vae import AutoencoderKL

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ldm_jax.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def test_convert_command_writes_a_loadable_bundle(tmp_path, fixtures_dir):
    out = tmp_path / "dit"
    result = _cli("convert", "--from=dit_diffusers", f"--src={fixtures_dir / 'dit_tiny_diffusers'}", f"--out={out}")
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
    result = _cli("convert", "--from=dit_official")
    assert result.returncode != 0
    assert "--src" in result.stderr and "--out" in result.stderr


def test_encode_command_caches_what_the_vae_encodes(tmp_path):
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    params = serialization.nn.unbox(jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
    serialization.save_model(tmp_path / "vae", vae, params)
    result = _cli("encode", "--config=configs/dit_digits.py", f"--config.vae.path={tmp_path / 'vae'}",
                  "--config.data.split=test", "--config.data.batch_size=32", "--config.data.random_flip=False",
                  f"--out={tmp_path / 'latents'}", "--shard_size=128")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--config.data.source=latents" in result.stdout
    cache = sources.LatentSource(str(tmp_path / "latents"))
    digits = sources.DigitsSource("test")
    assert len(cache) == len(digits) == 300
    images = np.stack([to_unit_range(center_crop_arr(to_pil_rgb(digits[i]["image"]), 16)) for i in (0, 299)])
    posterior = vae.apply({"params": params}, jnp.asarray(images), method=vae.encode)
    for row, index in enumerate((0, 299)):
        np.testing.assert_allclose(cache[index]["mean"][0], posterior.mean[row], rtol=1e-5, atol=1e-5)
        assert cache[index]["label"] == digits[index]["label"]
