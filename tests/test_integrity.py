"""Integrity of what the project reads (issue 18, part 3): model bundles, latent cache shards and sample
chunks carry checksums written at creation and checked on read; a damaged file is a one-line error naming
it (a damaged sample chunk, the project's own temporary file, is sampled again with a warning); a sampler
that produces non-finite values writes no samples and says so."""
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import storage
from ldm_jax.data import pipeline, sources
from ldm_jax.inference import sample_files, sampling
from ldm_jax.models import serialization
from ldm_jax.models.dit import DiT
from bundles import random_params
from subprocesses import ROOT, cpu_env
from test_latent_cache import _cache
from test_sampling import _config

# A short sampling run: 3 chunks of 8 (one per device), a 1 x 2 grid, 4 DDIM steps.
QUICK = dict(sampler="ddim", num_steps=4, guidance_scale=2.0, num_samples=24, batch_size=8, grid_rows=1, grid_cols=2)
REMEDY = "re-export or re-convert the bundle"


@pytest.fixture(scope="module")
def dit():
    """(module, params) of a tiny pixel-space DiT (test_sampling's)."""
    model = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=10,
                learn_sigma=True)
    return model, random_params(model, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))


@pytest.fixture(scope="module")
def bundle(dit, tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "model"
    serialization.save_model(path, *dit)
    return path


@pytest.fixture(scope="module")
def sharding():
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return pipeline.batch_sharding(mesh)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, sharding):
    """A latent cache of the 300 test digits in 5 shards (test_latent_cache's stand-in encoder)."""
    out_dir = tmp_path_factory.mktemp("cache")
    _cache(sources.DigitsSource("test"), out_dir, sharding)
    return out_dir


def _damaged_copy(folder, tmp_path):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def _largest_params_file(bundle):
    return max((p for p in (bundle / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path, offset, length):
    """Inverts `length` bytes of the file at `path` (local or gs://) from `offset`."""
    data = bytearray(storage.path(path).read_bytes())
    data[offset:offset + length] = bytes(b ^ 0xFF for b in data[offset:offset + length])
    storage.path(path).write_bytes(bytes(data))


def _one_line_error(error):
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_bundle_records_a_checksum_of_every_params_file(bundle):
    checksums = json.loads((bundle / "model.json").read_text())["checksums"]
    files = sorted(os.fspath(p.relative_to(bundle)) for p in (bundle / "params").rglob("*") if p.is_file())
    assert sorted(checksums) == files
    assert all(checksums[name] == storage.digest(bundle / name) for name in files)


def test_flipped_bytes_in_a_params_file_are_refused_naming_it(bundle, tmp_path):
    damaged = _damaged_copy(bundle, tmp_path)
    target = _largest_params_file(damaged)
    _flip(target, target.stat().st_size // 2, 64)
    with pytest.raises(ValueError) as error:
        serialization.load_model(damaged)
    assert _one_line_error(error) == f"{target}: checksum mismatch (the file is damaged); {REMEDY}"


def test_truncated_and_missing_params_files_are_refused_naming_them(bundle, tmp_path):
    damaged = _damaged_copy(bundle, tmp_path)
    target = _largest_params_file(damaged)
    size = target.stat().st_size
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(ValueError) as error:
        serialization.load_model(damaged)
    assert _one_line_error(error) == (f"{target}: 100 bytes, {size} when written (the file is truncated or damaged); "
                                      f"{REMEDY}")
    target.unlink()
    with pytest.raises(ValueError, match=f"^{target}: missing; {REMEDY}$"):
        serialization.load_model(damaged)


def test_a_bundle_saved_before_checksums_loads_with_a_warning(bundle, dit, tmp_path, caplog):
    old = _damaged_copy(bundle, tmp_path)
    spec = json.loads((old / "model.json").read_text())
    del spec["checksums"]
    (old / "model.json").write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING):
        _, params, _ = serialization.load_model(old)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, dit[1])
    warnings = [r.getMessage() for r in caplog.records if "records no checksums" in r.getMessage()]
    assert warnings == [f"{old} records no checksums (saved before ldm_jax recorded them): its params are not "
                        "verified; save it again to add them"]


def test_ldm_jax_sample_refuses_a_damaged_bundle_in_one_line(bundle, tmp_path):
    damaged = _damaged_copy(bundle, tmp_path)
    target = _largest_params_file(damaged)
    _flip(target, target.stat().st_size // 2, 64)
    out_dir = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, "-m", "ldm_jax.cli", "sample", "--config=configs/dit_digits.py", f"--workdir={tmp_path}",
         f"--config.sample.model_path={damaged}", f"--config.sample.out_dir={out_dir}"],
        cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"ldm-jax sample: error: ValueError: {target}: checksum mismatch (the file is damaged); {REMEDY}")
    assert "Traceback" not in result.stderr
    assert not out_dir.exists()


def test_a_damaged_gcs_bundle_is_refused_naming_the_object(gcs, dit, tmp_path):
    path = gcs.uri(tmp_path.name, "model")
    serialization.save_model(path, *dit)
    checksums = json.loads(storage.path(path).joinpath("model.json").read_text())["checksums"]
    name = max(checksums, key=lambda n: checksums[n]["bytes"])
    _flip(f"{path}/{name}", checksums[name]["bytes"] // 2, 64)
    with pytest.raises(ValueError) as error:
        serialization.load_model(path)
    assert _one_line_error(error) == f"{path}/{name}: checksum mismatch (the file is damaged); {REMEDY}"
    assert not (ROOT / "gs:").exists() and not (tmp_path / "gs:").exists()


def _shard(cache_dir, k=2):
    return sources.latent_shard_path(str(cache_dir), k, 5)


@pytest.mark.parametrize("length", [64, 4096])  # a short and a long block of garbage
def test_garbage_in_a_latent_shard_is_refused_when_the_cache_is_opened(cache, sharding, tmp_path, length):
    damaged = _damaged_copy(cache, tmp_path)
    shard = _shard(damaged)
    with open(shard, "r+b") as f:
        f.seek(2000)  # inside the shard's records
        f.write(np.random.default_rng(length).bytes(length))
    with pytest.raises(ValueError) as error:
        sources.LatentSource(str(damaged))
    assert _one_line_error(error) == (f"{shard}: checksum mismatch (the file is damaged); delete it and its .json, "
                                      "then run the caching (`ldm-jax encode`) again to rewrite it")
    with pytest.raises(ValueError, match=f"^{shard}: checksum mismatch"):
        pipeline.make_pipeline(_latent_config(damaged), sharding)  # what training opens


def _latent_config(cache_dir):
    config = pipeline.default_config()
    config.update(dict(source="latents", path=str(cache_dir), batch_size=16, shuffle=False, num_threads=2,
                       latent_norm="scale"))
    return config


def test_a_cache_too_big_to_hash_on_open_refuses_a_damaged_record_as_it_is_read(cache, tmp_path):
    damaged = _damaged_copy(cache, tmp_path)
    shard = _shard(damaged)
    with open(shard, "r+b") as f:
        f.seek(2000)
        f.write(np.random.default_rng(0).bytes(64))
    source = sources.LatentSource(str(damaged), verify_limit=0)  # as a cache bigger than VERIFY_ON_OPEN_BYTES
    assert source[0]["index"] == 0  # the intact shards read as before
    records = grain.MapDataset.source(source).to_iter_dataset(grain.ReadOptions(num_threads=2))
    with pytest.raises(ValueError) as error:
        list(records)
    assert re.match(rf"{shard}: record 1\d\d is damaged \(Corrupted Riegeli/records file", _one_line_error(error))
    assert str(error.value).endswith("; delete it and its .json, then run the caching (`ldm-jax encode`) again to "
                                     "rewrite it")


def test_a_cache_made_before_checksums_opens_with_a_warning(cache, tmp_path, caplog):
    old = _damaged_copy(cache, tmp_path)
    for k in range(5):
        sums_file = storage.path(_shard(old, k) + ".json")
        sums = json.loads(sums_file.read_text())
        assert sums["bytes"] == os.path.getsize(_shard(old, k))
        sums_file.write_text(json.dumps({key: v for key, v in sums.items() if key not in ("sha256", "bytes")}))
    with caplog.at_level(logging.WARNING):
        source = sources.LatentSource(str(old))
    assert any(f"latent cache {old} records no shard checksums" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(source.channel_stats(), sources.LatentSource(str(cache)).channel_stats())


def test_a_damaged_gcs_latent_shard_is_refused_naming_the_object(gcs, sharding, tmp_path):
    cache_dir = gcs.uri(tmp_path.name, "cache")
    _cache(sources.DigitsSource("test"), cache_dir, sharding)
    shard = _shard(cache_dir)
    _flip(shard, 2000, 64)
    with pytest.raises(ValueError, match=f"^{shard}: checksum mismatch"):
        sources.LatentSource(cache_dir)
    assert not (ROOT / "gs:").exists() and not (tmp_path / "gs:").exists()


def test_damaged_sample_chunks_are_sampled_again_with_a_warning(bundle, tmp_path, caplog):
    reference = tmp_path / "reference"
    sampling.sample_from_config(_config(reference, bundle, **QUICK), str(tmp_path))
    samples = np.load(reference / "samples.npz")
    # A restart's out_dir: its protocol and three chunks, as a killed run leaves them.
    restart = tmp_path / "restart"
    (restart / "chunks").mkdir(parents=True)
    shutil.copy(reference / "protocol.json", restart / "protocol.json")
    for start in (0, 8, 16):
        sample_files.write_chunk(sample_files.chunk_path(str(restart), start, start + 8),
                                 samples["arr_0"][start:start + 8], samples["arr_1"][start:start + 8],
                                 np.arange(start, start + 8))
    flipped, altered = sample_files.chunk_path(str(restart), 8, 16), sample_files.chunk_path(str(restart), 16, 24)
    _flip(flipped, os.path.getsize(flipped) // 2, 64)
    with np.load(altered) as data:  # a whole npz whose images are not those its checksum was made of
        arrays = {name: data[name] for name in data.files}
    arrays["images"] = 255 - arrays["images"]
    np.savez(altered, **arrays)
    with caplog.at_level(logging.INFO):
        sampling.sample_from_config(_config(restart, bundle, **QUICK), str(tmp_path))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"sample chunk {flipped} is damaged (unreadable: ") for m in messages)
    assert f"sample chunk {altered} is damaged (checksum mismatch): it is not reused" in messages
    assert any("sampling 2 of 3 chunks (1 already written)" in m for m in messages)
    assert (restart / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()


def test_a_sampler_that_produces_non_finite_values_writes_no_samples(dit, tmp_path):
    model, params = dit
    broken = tmp_path / "nan-model"  # weights a diverged training run could export
    serialization.save_model(broken, model, jax.tree.map(lambda p: np.full_like(p, np.nan), params))
    out_dir = tmp_path / "samples"
    with pytest.raises(FloatingPointError) as error:
        sampling.sample_from_config(_config(out_dir, broken, **QUICK), str(tmp_path))
    assert _one_line_error(error) == (
        "the sampler produced non-finite values at samples 0-1 (sample.guidance_scale=2.0, sample.sampler=ddim, "
        f"sample.num_steps=4, or the weights in {broken}); nothing was written for them")
    assert sorted(p.name for p in out_dir.iterdir()) == ["protocol.json"]  # no grid, no chunk, no samples
