"""The `ldm-jax` commands as users run them (real subprocesses): convert and encode."""
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import latent_space
from ldm_jax.convert.dit import dit_from_diffusers
from ldm_jax.data import sources
from ldm_jax.data.transforms import center_crop_arr, to_pil_rgb, to_unit_range
from ldm_jax.models import serialization
from ldm_jax.models.vae import AutoencoderKL

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this module out

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, cwd=ROOT, timeout=900, progress=None):
    """Runs `ldm-jax *args`; `progress="1"` draws its progress bar into the captured stderr."""
    env = dict(os.environ, **({} if progress is None else {"LDM_JAX_PROGRESS": progress}))
    return subprocess.run([sys.executable, "-m", "ldm_jax.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _convert(fixtures_dir, out, *args, **kwargs):
    return _cli("convert", "--from=dit_diffusers", f"--src={fixtures_dir / 'dit_tiny_diffusers'}", f"--out={out}",
                *args, **kwargs)


def _one_line_error(result):
    """The last line of a failed command's stderr: its one-line error (no traceback printed)."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("ldm-jax convert: error: "), result.stderr[-3000:]
    return line


def test_convert_command_writes_a_loadable_bundle(tmp_path, fixtures_dir):
    out = tmp_path / "dit"
    result = _cli("convert", "--from=dit_diffusers", f"--src={fixtures_dir / 'dit_tiny_diffusers'}", f"--out={out}",
                  progress="1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote DiT bundle" in result.stdout and "convert dit_diffusers: 100%" in result.stderr
    module, params, metadata = serialization.load_model(out)
    reference_module, reference_params = dit_from_diffusers(fixtures_dir / "dit_tiny_diffusers")
    assert module == reference_module and metadata["format"] == "dit_diffusers"
    data = np.load(fixtures_dir / "dit_tiny_diffusers.npz")
    x = jnp.asarray(data["x"])
    out_a = module.apply({"params": params}, x, jnp.asarray(data["t"]), jnp.asarray(data["y"]))
    out_b = reference_module.apply({"params": reference_params}, x, jnp.asarray(data["t"]), jnp.asarray(data["y"]))
    np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))
    again = _convert(fixtures_dir, out)
    assert "holds a model bundle already; pass --overwrite" in _one_line_error(again)
    replaced = _convert(fixtures_dir, out, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit"]


def test_convert_never_deletes_files_it_did_not_write(tmp_path, fixtures_dir):
    (tmp_path / "notes.txt").write_text("notes")
    error = _one_line_error(_convert(fixtures_dir, ".", cwd=tmp_path))
    assert f"{tmp_path} is neither empty nor a model bundle (it holds notes.txt)" in error
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "data.csv").write_text("1,2")
    (folder / "thesis.txt").write_text("years of work")
    error = _one_line_error(_convert(fixtures_dir, folder, "--overwrite"))
    assert f"{folder} is neither empty nor a model bundle (it holds sub/, thesis.txt)" in error
    assert (folder / "thesis.txt").read_text() == "years of work" and (folder / "sub" / "data.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.txt"]


def _read_only_dir(tmp_path):
    (tmp_path / "read_only").mkdir(mode=0o555)
    return tmp_path / "read_only" / "bundle"


@pytest.mark.parametrize("target", [
    pytest.param(lambda tmp_path: tmp_path / "file" / "bundle", id="under-a-file"),
    pytest.param(lambda tmp_path: pathlib.Path("/proc/ldm_jax_test/bundle"), id="unwritable-even-for-root"),
    pytest.param(_read_only_dir, id="read-only-dir", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root may write to a read-only directory")),
])
def test_convert_to_an_unwritable_target_exits_promptly(tmp_path, fixtures_dir, target):
    (tmp_path / "file").write_text("x")
    start = time.monotonic()
    result = _convert(fixtures_dir, target(tmp_path), timeout=60)  # it used to hang (orbax's threads)
    assert time.monotonic() - start < 60
    assert str(target(tmp_path).parent) in _one_line_error(result)


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
                  f"--out={tmp_path / 'latents'}", "--shard_size=128", progress="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encode: 100%" in result.stderr and "300/300" in result.stderr
    assert "--config.data.source=latents" in result.stdout
    cache = sources.LatentSource(str(tmp_path / "latents"))
    assert cache.meta["vae"] == latent_space.vae_identity(vae, params)  # what training checks vae.path against
    digits = sources.DigitsSource("test")
    assert len(cache) == len(digits) == 300
    images = np.stack([to_unit_range(center_crop_arr(to_pil_rgb(digits[i]["image"]), 16)) for i in (0, 299)])
    posterior = vae.apply({"params": params}, jnp.asarray(images), method=vae.encode)
    for row, index in enumerate((0, 299)):
        np.testing.assert_allclose(cache[index]["mean"][0], posterior.mean[row], rtol=1e-5, atol=1e-5)
        assert cache[index]["label"] == digits[index]["label"]


# Each importer of convert/registry.py, on its committed fixture, as a user types it.
IMPORTS = {
    "vae_diffusers": "vae_tiny_diffusers",
    "dit_diffusers": "dit_tiny_diffusers",
    "pixart_diffusers": "pixart_tiny_diffusers",
    "clip_transformers": "clip_tiny/text_encoder",
    "unet_diffusers": "unet_sd1",
}


def test_every_importer_is_reachable_from_the_command_line(tmp_path, fixtures_dir):
    from ldm_jax.convert.registry import IMPORTERS

    # dit_official: its fixture is no preset size, which --model names (test_convert_dit.py tests it)
    assert set(IMPORTS) | {"dit_official"} == set(IMPORTERS)
    for name, fixture in IMPORTS.items():
        out = tmp_path / name
        result = _cli("convert", f"--from={name}", f"--src={fixtures_dir / fixture}", f"--out={out}")
        assert result.returncode == 0, result.stderr[-3000:]
        module, params, metadata = serialization.load_model(out)
        expected_module, expected = IMPORTERS[name].load(str(fixtures_dir / fixture), {})
        assert module == expected_module and metadata["format"] == name
        jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_export_writes_a_folder_the_importer_reads_back(tmp_path, fixtures_dir):
    from ldm_jax.convert.vae import vae_from_diffusers

    bundle, exported = tmp_path / "bundle", tmp_path / "exported"
    assert _cli("convert", "--from=vae_diffusers", f"--src={fixtures_dir / 'vae_tiny_diffusers'}",
                f"--out={bundle}").returncode == 0
    result = _cli("convert", "--to=vae_diffusers", f"--src={bundle}", f"--out={exported}")
    assert result.returncode == 0, result.stderr[-3000:]
    module, params, _ = serialization.load_model(bundle)
    round_trip_module, round_trip = vae_from_diffusers(exported)
    assert round_trip_module == module
    jax.tree.map(np.testing.assert_array_equal, round_trip, params)
    error = _one_line_error(_cli("convert", "--to=vae_diffusers", f"--src={bundle}", f"--out={exported}"))
    assert "exists" in error  # never replaced without --overwrite
    (exported / "notes.txt").write_text("mine")
    error = _one_line_error(_cli("convert", "--to=vae_diffusers", f"--src={bundle}", f"--out={exported}",
                                 "--overwrite"))
    assert "notes.txt" in error and (exported / "notes.txt").read_text() == "mine"  # never deleted
