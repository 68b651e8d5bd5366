"""Transforms and the grain pipeline: crop semantics, host batches, global sharding, exact resume."""
import json

from absl import flags
import jax
import numpy as np
from PIL import Image
import pytest

from ldm_jax.data import pipeline
from ldm_jax.data import sources
from ldm_jax.data import transforms
from subprocesses import run_python_hosts


@pytest.fixture(scope="module")
def sharding():
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return pipeline.batch_sharding(mesh)


def _config(**overrides):
    config = pipeline.default_config()
    config.update(dict(source="digits", split="test", image_size=16, batch_size=16, num_threads=2))
    config.update(overrides)
    return config


class IndexImages:
    """A source of 2x2 images that hold their own index in the red channel (so outputs can be traced
    back) and a dark-to-bright green ramp (so flips show); it records the indices it is asked for."""

    def __init__(self, n):
        self.n = n
        self.reads = []

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        self.reads.append(index)
        image = np.zeros((2, 2, 3), np.uint8)
        image[..., 0], image[:, 1, 1] = index, 255
        return {"image": image, "label": index % 7}


def _prepared(source, n, size=16):
    """The first n images of `source`, center-cropped to `size` and scaled, unflipped: [n, S, S, 3]."""
    crops = [transforms.center_crop_arr(source[i]["image"], size) for i in range(n)]
    return transforms.to_unit_range(np.stack(crops))


def _indices(batch):
    """Source index of each row of an IndexImages batch (red values are index/127.5 - 1)."""
    return np.rint((np.asarray(batch["image"])[:, 0, 0, 0] + 1) * 127.5).astype(int)


def _flipped(batch):
    """Which rows of an IndexImages batch are mirrored (green ramp bright on the left)."""
    image = np.asarray(batch["image"])
    return image[:, 0, 0, 1] > image[:, 0, -1, 1]


# --- transforms ---------------------------------------------------------------------------------


def test_center_crop_halves_with_box_then_crops_the_center():
    # 2x2 blocks of equal pixels: BOX halving returns the block values exactly. Short side 64 >= 2*32
    # -> one halving to 32x48, bicubic resize to the same size (identity), then columns 8..40.
    small = np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8)
    image = Image.fromarray(np.kron(small, np.ones((2, 2, 1), np.uint8)))
    np.testing.assert_array_equal(transforms.center_crop_arr(image, 32), small[:, 8:40])


def test_center_crop_upsamples_small_and_rounds_sides():
    constant = np.full((8, 8, 3), 77, np.uint8)
    np.testing.assert_array_equal(transforms.center_crop_arr(constant, 32), np.full((32, 32, 3), 77))
    # 33x50, no halving (33 < 64): the short side goes to 32, the long one to round(50*32/33) = 48.
    ramp = np.tile(np.arange(50, dtype=np.uint8)[None, :, None] * 5, (33, 1, 3))
    out = transforms.center_crop_arr(Image.fromarray(ramp), 32)
    assert out.shape == (32, 32, 3)
    resized = np.asarray(Image.fromarray(ramp).resize((48, 32), Image.BICUBIC))
    np.testing.assert_array_equal(out, resized[:, 8:40])
    grey = transforms.center_crop_arr(np.full((4, 4, 1), 9, np.uint8), 4)
    assert grey.shape == (4, 4, 3) and (grey == 9).all()


def test_unit_range_flip_and_latent_normalisation():
    np.testing.assert_array_equal(transforms.to_unit_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])
    x = np.arange(12).reshape(1, 2, 2, 3)
    np.testing.assert_array_equal(transforms.hflip(x)[0, :, 0], x[0, :, 1])
    z = np.random.default_rng(0).normal(size=(2, 2, 4)).astype(np.float32)
    shift, scale = np.arange(4, dtype=np.float32), np.float32(0.5) + np.arange(4, dtype=np.float32)
    normed = transforms.normalize_latent(z, shift, scale)
    np.testing.assert_allclose(normed[..., 1], (z[..., 1] - 1.0) * 1.5, rtol=1e-6)


# --- host batches --------------------------------------------------------------------------------


def _host_batches(config, source, index, count, global_batch=8):
    transform, _ = pipeline.example_transform(config, source)
    per_host = global_batch // count
    return pipeline.make_grain_dataset(
        config, source, transform, per_host_batch=per_host, process_index=index, process_count=count
    )


@pytest.mark.parametrize("count", [2, 4])
def test_simulated_hosts_concatenate_to_the_single_process_batches(count):
    # 38 examples x 2 epochs in global batches of 8: batch 4 holds the end of epoch 1 and the start
    # of epoch 2; 76 // 8 = 9 batches, the last 4 examples are never read.
    config = pipeline.resolve_config(_config(num_epochs=2, seed=5))
    single = list(_host_batches(config, IndexImages(38), 0, 1))
    rows = np.concatenate([_indices(b) for b in single])
    assert len(single) == 9 and sorted(rows[:38]) == list(range(38))
    assert len(set(rows[38:])) == 34 and not np.array_equal(rows[:34], rows[38:])  # reshuffled
    flips = np.concatenate([_flipped(b) for b in single])
    assert 20 < flips.sum() < 52  # per-example flips, about half

    sources_ = [IndexImages(38) for _ in range(count)]
    hosts = [list(_host_batches(config, sources_[i], i, count)) for i in range(count)]
    for step, want in enumerate(single):
        got = [host[step] for host in hosts]
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    assert {len(host) for host in hosts} == {9}
    for source, host in zip(sources_, hosts):  # a host reads (and decodes) only its own rows
        assert sorted(source.reads) == sorted(np.concatenate([_indices(b) for b in host]))


def test_host_state_resumes_exactly_and_with_another_process_count():
    config = pipeline.resolve_config(_config(seed=2))
    host = iter(_host_batches(config, IndexImages(30), 1, 2))
    for _ in range(5):
        next(host)
    state = json.loads(json.dumps(host.get_state()))
    want = [next(host) for _ in range(3)]  # crosses into epoch 2 (30 examples = 3.75 global batches)
    resumed = iter(_host_batches(config, IndexImages(30), 1, 2))
    resumed.set_state(state)
    single = iter(_host_batches(config, IndexImages(30), 0, 1))
    single.set_state(state)
    for w in want:
        got, whole = next(resumed), next(single)
        for key in ("image", "label"):
            np.testing.assert_array_equal(got[key], w[key])
            np.testing.assert_array_equal(whole[key][4:], w[key])  # host 1's rows of the global batch


def test_too_few_examples_for_one_global_batch_raise():
    config = pipeline.resolve_config(_config(num_epochs=1))
    with pytest.raises(ValueError, match=r"data.batch_size=8: 6 examples x data.num_epochs=1"):
        _host_batches(config, IndexImages(6), 0, 2)
    with pytest.raises(ValueError, match="process_index=2"):
        _host_batches(config, IndexImages(16), 2, 2)


MULTIHOST_WORKER = r"""
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from jax.experimental import multihost_utils
from ldm_jax.data import pipeline

config = pipeline.default_config()
config.update(dict(source="image_folder", path=sys.argv[3], image_size=8, batch_size=8, num_threads=2,
                   seed=1))
resolved = pipeline.resolve_config(config)
source = pipeline.make_source(resolved)
transform, _ = pipeline.example_transform(resolved, source)
single = iter(pipeline.make_grain_dataset(resolved, source, transform, per_host_batch=8, process_index=0,
                                          process_count=1))
want = [next(single) for _ in range(10)]  # 37 images: batches 4 and 9 span epoch boundaries
axes, auto = ("data", "fsdp", "tensor"), (jax.sharding.AxisType.Auto,) * 3
process_major = jax.make_mesh((4, 1, 1), axes, axis_types=auto)
reversed_ = jax.sharding.Mesh(process_major.devices[::-1], axes, axis_types=auto)  # process 1 first
for mesh, slot in ((process_major, jax.process_index()), (reversed_, 1 - jax.process_index())):
    sharding = pipeline.batch_sharding(mesh)
    assert pipeline.host_slot(sharding, 8) == slot
    iterator = pipeline.make_pipeline(config, sharding)
    for w in want:
        batch = next(iterator)
        for key in ("image", "label"):
            np.testing.assert_array_equal(multihost_utils.process_allgather(batch[key], tiled=True), w[key])
print("ok", jax.process_index())
"""


def test_two_real_processes_give_the_single_process_global_batches(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(37):  # random 12x10 images (center-cropped to 8x8, flips show) in 3 classes
        folder = tmp_path / f"class{i % 3}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8)).save(folder / f"{i}.png")
    run_python_hosts(MULTIHOST_WORKER, tmp_path, timeout=120)


# --- global batches -------------------------------------------------------------------------------


def test_batches_are_global_arrays_sharded_like_the_mesh(sharding):
    iterator = pipeline.make_pipeline(_config(shuffle=False, random_flip=False), sharding)
    batch = next(iterator)
    assert batch["image"].shape == (16, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    for array in batch.values():
        assert array.sharding.is_equivalent_to(sharding, array.ndim)
        shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
        assert len(shards) == 8 and all(s.data.shape[0] == 2 for s in shards)
    # Unshuffled, unflipped: row i is test digit i, cropped and scaled.
    source = sources.DigitsSource("test")
    expected = _prepared(source, 16)
    np.testing.assert_array_equal(np.asarray(batch["image"]), expected)
    np.testing.assert_array_equal(np.asarray(batch["label"]), [source[i]["label"] for i in range(16)])
    assert iterator.class_names == tuple(str(d) for d in range(10)) and iterator.latent_norm is None


def test_random_flip_is_per_example_and_reproducible():
    config = pipeline.resolve_config(_config(shuffle=False))
    source = sources.DigitsSource("test")
    transform, _ = pipeline.example_transform(config, source)

    def first_batches():
        dataset = pipeline.make_grain_dataset(
            config, source, transform, per_host_batch=50, process_index=0, process_count=1
        )
        iterator = iter(dataset)
        return [next(iterator)["image"] for _ in range(2)]

    images = np.concatenate(first_batches())
    plain = _prepared(source, 100)
    flipped = np.array([np.array_equal(images[i], transforms.hflip(plain[i])) for i in range(100)])
    unflipped = np.array([np.array_equal(images[i], plain[i]) for i in range(100)])
    symmetric = np.array([np.array_equal(plain[i], transforms.hflip(plain[i])) for i in range(100)])
    assert (flipped | unflipped).all()
    assert 25 < (flipped & ~symmetric).sum() and 25 < (unflipped & ~symmetric).sum()
    np.testing.assert_array_equal(np.concatenate(first_batches()), images)


def test_resume_from_saved_state_reproduces_the_remaining_batches(sharding):
    # 300 test digits / 16 = 18 batches an epoch: the resumed stretch crosses into epoch 2.
    config = _config(seed=3)
    uninterrupted = pipeline.make_pipeline(config, sharding)
    for _ in range(16):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    expected = [next(uninterrupted) for _ in range(4)]
    resumed = pipeline.make_pipeline(config, sharding)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    other_seed = pipeline.make_pipeline(_config(seed=4), sharding)
    other_seed.set_state(state)
    assert not np.array_equal(np.asarray(next(other_seed)["label"]), np.asarray(expected[0]["label"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_size=12), "data.batch_size=12 must be divisible"),
        (dict(source="mnist"), "data.source='mnist'"),
        (dict(latent_norm="minmax"), "data.latent_norm='minmax'"),
        (dict(image_size=0), "data.image_size=0"),
        (dict(split="val"), "data.split='val'"),
    ],
)
def test_bad_config_values_raise_naming_the_field(sharding, overrides, message):
    with pytest.raises(ValueError, match=message):
        pipeline.make_pipeline(_config(**overrides), sharding)


def test_unknown_config_field_raises(sharding):
    config = _config()
    config.batchsize = 8
    with pytest.raises(ValueError, match="batchsize"):
        pipeline.make_pipeline(config, sharding)


def test_multiprocess_prefetch_matches_in_process_and_resumes(sharding):
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    in_process = pipeline.make_pipeline(_config(), sharding)
    want = [np.asarray(next(in_process)["image"]) for _ in range(3)]
    # One worker reads the whole stream, so it yields exactly the in-process batches.
    prefetched = pipeline.make_pipeline(_config(num_workers=1), sharding)
    try:
        np.testing.assert_array_equal(np.asarray(next(prefetched)["image"]), want[0])
        state = prefetched.get_state()
        for w in want[1:]:
            np.testing.assert_array_equal(np.asarray(next(prefetched)["image"]), w)
        prefetched.set_state(state)  # rewind
        for w in want[1:]:
            np.testing.assert_array_equal(np.asarray(next(prefetched)["image"]), w)
    finally:
        prefetched.close()
