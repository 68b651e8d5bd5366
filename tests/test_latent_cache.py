"""Latent caching: cached posteriors equal on-the-fly encoding; resume, multi-host shards, reading."""
import errno
import json
import logging
import os
import re

from array_record.python import array_record_module
import jax
import numpy as np
from PIL import Image
import pytest

from ldm_jax.data import latent_cache
from ldm_jax.data import pipeline
from ldm_jax.data import sources
from ldm_jax.data import transforms
from subprocesses import run_python_hosts

IMAGE_SIZE, FACTOR, CHANNELS = 16, 4, 4
SHARD = 64  # 300 test digits -> shards of 64, 64, 64, 64, 44
PROJECTION = np.random.default_rng(0).normal(size=(3, 2 * CHANNELS)).astype(np.float32)


def encode_fn(images):
    """A fixed deterministic encoder: 4x4 average pool, a linear map to mean and softplus std."""
    b, h, w, c = images.shape
    pooled = images.reshape(b, h // FACTOR, FACTOR, w // FACTOR, FACTOR, c).mean(axis=(2, 4))
    features = pooled @ PROJECTION
    return features[..., :CHANNELS], jax.nn.softplus(features[..., CHANNELS:])


class Posterior:
    """A posterior object, as a VAE's encode may return."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std


def posterior_encode_fn(images):
    return Posterior(*encode_fn(images))


@pytest.fixture(scope="module")
def sharding():
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return pipeline.batch_sharding(mesh)


@pytest.fixture(scope="module")
def digits():
    return sources.DigitsSource("test")


def _cache(source, out_dir, sharding, fn=encode_fn, **kwargs):
    defaults = dict(image_size=IMAGE_SIZE, downsample_factor=FACTOR, batch_size=16, shard_size=SHARD)
    kwargs = {**defaults, **kwargs}
    return latent_cache.cache_latents(source, fn, str(out_dir), sharding=sharding, **kwargs)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, digits, sharding):
    out_dir = tmp_path_factory.mktemp("latents")
    _cache(digits, out_dir, sharding)
    return str(out_dir)


@pytest.fixture(scope="module")
def expected(digits):
    """On-the-fly (unsharded, unbatched-by-cache) encoding of every test digit and its mirror."""
    crops = [transforms.center_crop_arr(digits[i]["image"], IMAGE_SIZE) for i in range(len(digits))]
    images = transforms.to_unit_range(np.stack(crops))
    plain, mirrored = jax.jit(encode_fn)(images), jax.jit(encode_fn)(transforms.hflip(images))
    return {"mean": np.stack([plain[0], mirrored[0]], 1), "std": np.stack([plain[1], mirrored[1]], 1)}


def _read_all(cache):
    source = sources.LatentSource(cache)
    records = [source[i] for i in range(len(source))]
    order = np.argsort([r["index"] for r in records])
    return {key: np.stack([records[i][key] for i in order]) for key in ("index", "mean", "std", "label")}


def test_cached_posteriors_equal_encoding_on_the_fly(cache_dir, expected, digits):
    cached = _read_all(cache_dir)
    np.testing.assert_array_equal(cached["index"], np.arange(300))
    assert cached["mean"].shape == (300, 2, 4, 4, CHANNELS) and cached["mean"].dtype == np.float32
    np.testing.assert_allclose(cached["mean"], expected["mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cached["std"], expected["std"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cached["label"], [digits[i]["label"] for i in range(300)])
    meta = sources.LatentSource(cache_dir).meta
    assert meta["num_shards"] == 5 and meta["variants"] == 2 and meta["latent_shape"] == [4, 4, CHANNELS]
    assert meta["class_names"] == list(digits.class_names)


def test_posterior_object_encoder_and_float16_storage(tmp_path, digits, sharding, expected):
    _cache(digits, tmp_path, sharding, fn=posterior_encode_fn, flip=False, dtype="float16")
    cached = _read_all(str(tmp_path))
    assert cached["mean"].shape == (300, 1, 4, 4, CHANNELS) and cached["mean"].dtype == np.float16
    np.testing.assert_allclose(cached["mean"][:, 0], expected["mean"][:, 0], rtol=2e-3, atol=2e-3)


def test_channel_stats_match_the_whole_cache(cache_dir, expected):
    mean, std = sources.LatentSource(cache_dir).channel_stats()
    means, stds = expected["mean"].reshape(-1, CHANNELS), expected["std"].reshape(-1, CHANNELS)
    np.testing.assert_allclose(mean, means.mean(0), rtol=1e-5)
    # z = mean + std * eps: Var[z] = Var[mean] + E[std^2].
    np.testing.assert_allclose(std, np.sqrt(means.var(0) + (stds**2).mean(0)), rtol=1e-5)


def _latent_config(cache, **overrides):
    config = pipeline.default_config()
    # These caches come from a stand-in encoder, not a VAE bundle: normalised by data.latent_scale.
    config.update(dict(source="latents", path=cache, batch_size=16, shuffle=False, num_threads=2, latent_norm="scale"))
    config.update(overrides)
    return config


def test_latent_pipeline_mode_and_flip_variants(cache_dir, expected, sharding):
    mode_config = _latent_config(cache_dir, latent_sample=False, random_flip=False, latent_scale=0.18215)
    plain = pipeline.make_pipeline(mode_config, sharding)
    batch = next(plain)
    assert set(batch) == {"latent", "label"} and batch["latent"].sharding.is_equivalent_to(sharding, 4)
    want = expected["mean"][:16, 0] * 0.18215
    np.testing.assert_allclose(np.asarray(batch["latent"]), want, rtol=1e-6, atol=1e-7)
    flip_config = _latent_config(cache_dir, latent_sample=False, latent_scale=1.0)
    flipping = pipeline.make_pipeline(flip_config, sharding)
    latents = np.concatenate([np.asarray(next(flipping)["latent"]) for _ in range(4)])
    distance = np.abs(latents[:, None] - expected["mean"][:64]).max(axis=(2, 3, 4))  # [64, 2 variants]
    assert (distance.min(axis=1) < 1e-6).all()
    picked = distance.argmin(axis=1)
    assert 15 < picked.sum() < 49  # both variants are used


def test_latent_pipeline_samples_and_resumes_exactly(cache_dir, expected, sharding):
    config = _latent_config(cache_dir, shuffle=True, latent_norm="channel")
    iterator = pipeline.make_pipeline(config, sharding)
    shift, scale = iterator.latent_norm
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    want = [np.asarray(next(iterator)["latent"]) for _ in range(3)]
    resumed = pipeline.make_pipeline(config, sharding)
    resumed.set_state(state)
    for w in want:
        np.testing.assert_array_equal(np.asarray(next(resumed)["latent"]), w)
    # Samples differ from every mode, and over many draws normalised latents are ~ N(0, 1).
    z = np.concatenate(want) / scale + shift
    assert np.abs(z[:, None] - expected["mean"][None, :48]).max() > 1e-3
    many = np.concatenate([np.asarray(next(iterator)["latent"]) for _ in range(30)]).reshape(-1, CHANNELS)
    np.testing.assert_allclose(many.mean(0), 0.0, atol=0.15)
    np.testing.assert_allclose(many.std(0), 1.0, atol=0.15)


class FailingAt:
    """A source that breaks at one index, like a run killed part-way."""

    def __init__(self, source, fail_at):
        self.source, self.fail_at, self.reads = source, fail_at, []
        self.class_names = source.class_names

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.reads.append(index)
        if index == self.fail_at:
            raise RuntimeError("killed")
        return self.source[index]

    def __repr__(self):
        return repr(self.source)


def test_interrupted_run_resumes_skipping_finished_shards(tmp_path, digits, sharding, expected, caplog):
    with pytest.raises(RuntimeError, match="killed"):
        _cache(FailingAt(digits, fail_at=150), tmp_path, sharding)
    names = sorted(os.listdir(tmp_path))
    assert "latents-00001-of-00005.array_record" in names
    assert not [n for n in names if n.startswith("latents-00002") or n.endswith(".tmp")]  # the failure cleaned up
    with pytest.raises(ValueError, match="incomplete"):
        sources.LatentSource(str(tmp_path))
    # A run killed while writing shard 2 leaves its temporary file.
    (tmp_path / ".latents-00002-of-00005.array_record.tmp").write_bytes(b"half a shard")
    finished = sources.latent_shard_path(str(tmp_path), 0, 5)
    mtime = os.stat(finished).st_mtime_ns
    # A finished-looking shard that is truncated must be rewritten as well.
    truncated = sources.latent_shard_path(str(tmp_path), 1, 5)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    resumed = FailingAt(digits, fail_at=-1)
    with caplog.at_level(logging.WARNING):
        _cache(resumed, tmp_path, sharding)
    rewritten = [r.getMessage() for r in caplog.records if "Rewriting unfinished shard" in r.getMessage()]
    assert len(rewritten) == 2 and "00001-of-00005" in rewritten[0] and "00002-of-00005" in rewritten[1]
    assert os.stat(finished).st_mtime_ns == mtime
    assert min(i for i in resumed.reads if i > 0) == SHARD  # shard 0 was not read again
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    cached = _read_all(str(tmp_path))
    np.testing.assert_array_equal(cached["index"], np.arange(300))
    np.testing.assert_allclose(cached["mean"], expected["mean"], rtol=1e-6, atol=1e-6)


class FullDiskWriter(array_record_module.ArrayRecordWriter):
    """array_record's writer on a full disk: its buffered writes fail when it flushes (closes)."""

    def close(self):
        super().close()
        raise RuntimeError("write() failed: No space left on device; writing shard.tmp; at byte 65536")


def _json_full_disk_at(key):
    """json.dump, raising ENOSPC as a full disk does when its content has `key`."""
    dump = json.dump

    def full_disk_dump(content, f, **kwargs):
        if key in content:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return dump(content, f, **kwargs)

    return full_disk_dump


@pytest.mark.parametrize("failing", ["shard", "shard sums", "meta"])
def test_a_full_disk_is_one_error_and_leaves_no_temporary_file(tmp_path, digits, sharding, monkeypatch, failing):
    if failing == "shard":
        monkeypatch.setattr(latent_cache.array_record_module, "ArrayRecordWriter", FullDiskWriter)
    else:
        monkeypatch.setattr(latent_cache.json, "dump", _json_full_disk_at("sum_mean" if failing == "shard sums"
                                                                            else "format_version"))
    with pytest.raises(OSError, match=re.escape(f"disk full: '{tmp_path}'")) as raised:
        _cache(digits, tmp_path, sharding)
    assert raised.value.errno == errno.ENOSPC
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_each_simulated_host_writes_its_own_shards(tmp_path, digits, sharding, expected):
    _cache(digits, tmp_path, sharding, process_index=1, process_count=2)
    written = sorted(n for n in os.listdir(tmp_path) if n.endswith(".array_record"))
    assert written == [os.path.basename(sources.latent_shard_path("", k, 5)) for k in (1, 3)]
    _cache(digits, tmp_path, sharding, process_index=0, process_count=2)
    cached = _read_all(str(tmp_path))
    np.testing.assert_allclose(cached["std"], expected["std"], rtol=1e-6, atol=1e-6)


def test_captions_are_cached_and_batched_host_local(tmp_path, sharding):
    folder = tmp_path / "captioned"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.full((20, 24, 3), 30 * i, np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    _cache(sources.ImageFolderSource(str(folder)), tmp_path / "cache", sharding, batch_size=8)
    config = _latent_config(str(tmp_path / "cache"), batch_size=8, latent_sample=False, random_flip=False)
    batch = next(pipeline.make_pipeline(config, sharding))
    assert isinstance(batch["caption"], np.ndarray)
    assert list(batch["caption"]) == [f"caption {i}" for i in range(8)]
    assert sources.LatentSource(str(tmp_path / "cache")).meta["class_names"] is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=30), "image_size=30 is not divisible by the VAE downsampling factor 4"),
        (dict(downsample_factor=8), "not 2x2"),
        (dict(batch_size=12), "data.batch_size=12"),
        (dict(dtype="int8"), "dtype='int8'"),
    ],
)
def test_bad_caching_arguments_raise(tmp_path, digits, sharding, kwargs, message):
    # downsample_factor=8 on 16x16 images: the encoder (factor 4) makes 4x4 latents, not 2x2.
    args = {**dict(image_size=IMAGE_SIZE, downsample_factor=FACTOR, batch_size=16), **kwargs}
    with pytest.raises(ValueError, match=message):
        latent_cache.cache_latents(digits, encode_fn, str(tmp_path), sharding=sharding, **args)


def test_rerun_with_other_settings_is_refused(cache_dir, digits, sharding):
    with pytest.raises(ValueError, match="shard_size: 64 -> 32"):
        _cache(digits, cache_dir, sharding, shard_size=32)


def test_missing_cache_raises(tmp_path):
    with pytest.raises(ValueError, match="holds no latent cache"):
        sources.LatentSource(str(tmp_path))


MULTIHOST_WORKER = r"""
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from jax.experimental import multihost_utils
from ldm_jax.data import latent_cache, pipeline, sources
sys.path.insert(0, "tests")  # the workers run from the repository root
import test_latent_cache as t

assert jax.device_count() == 4 and jax.local_device_count() == 2
mesh = jax.make_mesh((4, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
sharding = pipeline.batch_sharding(mesh)
# 5 shards: process 0 writes 0, 2, 4 (172 examples), process 1 writes 1, 3 (128): unequal work.
latent_cache.cache_latents(sources.DigitsSource("test"), t.encode_fn, sys.argv[3], image_size=t.IMAGE_SIZE,
                           downsample_factor=t.FACTOR, batch_size=32, shard_size=t.SHARD, sharding=sharding)
multihost_utils.sync_global_devices("cached")
config = pipeline.default_config()
config.update(dict(source="latents", path=sys.argv[3], batch_size=8, shuffle=False, random_flip=False,
                   latent_sample=False, latent_norm="scale", latent_scale=1.0))
batch = next(pipeline.make_pipeline(config, sharding))
latent = multihost_utils.process_allgather(batch["latent"], tiled=True)
cache = sources.LatentSource(sys.argv[3])
# One global order: rows 0-3 (examples 0..3) come from host 0, rows 4-7 (4..7) from host 1.
want = np.stack([cache[i]["mean"][0] for i in range(8)])
np.testing.assert_array_equal(latent, want)
print("ok", jax.process_index())
"""


@pytest.mark.slow
def test_two_real_processes_cache_and_read_global_batches(tmp_path, expected):
    run_python_hosts(MULTIHOST_WORKER, tmp_path, timeout=120)
    cached = _read_all(str(tmp_path))
    np.testing.assert_array_equal(cached["index"], np.arange(300))
    np.testing.assert_allclose(cached["mean"], expected["mean"], rtol=1e-6, atol=1e-6)
