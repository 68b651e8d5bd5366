"""gs:// for model bundles, `ldm-jax sample` and `ldm-jax evaluate`, against the GCS emulator
(tests/gcs.py): a bundle round trip and its commit marker (model.json, written last), a sample run
killed and restarted to a byte-identical samples.npz, evaluation.json written to the bucket; no
local `gs:` folder is ever created."""
import io
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.cloud import storage as gcs_client
from PIL import Image

from ldm_jax import storage
from ldm_jax.evaluation import fid
from ldm_jax.inference import bundles, sampling
from ldm_jax.models import serialization
from ldm_jax.models.dit import DiT
from bundles import random_params
from subprocesses import ROOT, cpu_env, wait_for
from test_evaluate import IMAGE_SIZE, make_config
from test_sampling import DIFFUSION, SAMPLE, _config

pytestmark = pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 24 samples, 63-128 dims


def _objects(gcs, prefix):
    """Names of the objects below gs://<bucket>/<prefix>/, relative to it, read straight from the
    emulator (epath's gcsfs caches listings)."""
    start = len(prefix) + 1
    blobs = gcs_client.Client(project="test").list_blobs(gcs.bucket, prefix=prefix + "/")
    return sorted(blob.name[start:] for blob in blobs)


def _upload(uri, data):
    storage.path(uri).write_bytes(data)
    return uri


def _npz_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _assert_no_local_gs_folder():
    assert not (ROOT / "gs:").exists()  # the repository root, the cwd of every subprocess here


@pytest.fixture(scope="module")
def weights(fixtures_dir):
    """The tiny pytorch-fid Inception fixture (test_evaluate's)."""
    return str(fixtures_dir / "inception_fid_tiny.pth")


@pytest.fixture(scope="module")
def dit():
    """(module, params, other params) of a tiny pixel-space DiT (test_sampling's)."""
    model = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=10,
                learn_sigma=True)
    params = random_params(model, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    return model, params, jax.tree.map(lambda x: x + 1, params)


def _assert_params(path, params):
    _, loaded, _ = serialization.load_model(path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, params)


def test_bundle_round_trip_and_replace_on_gcs(gcs, dit, tmp_path):
    model, first, second = dit
    path = gcs.uri(tmp_path.name, "model")
    serialization.save_model(path, model, first, metadata={"note": "x"})
    loaded, _, metadata = serialization.load_model(path)
    assert loaded == model and metadata == {"note": "x"}
    _assert_params(path, first)
    objects = _objects(gcs, tmp_path.name)  # the bundle's files, in place: no temporaries beside it
    assert "model/model.json" in objects
    assert all(name == "model/model.json" or name.startswith("model/params/") for name in objects)
    with pytest.raises(ValueError, match="holds a model bundle already; pass --overwrite"):
        serialization.save_model(path, model, second)
    _assert_params(path, first)
    serialization.save_model(path, model, second, overwrite=True)
    _assert_params(path, second)
    _assert_no_local_gs_folder()


def test_a_bundle_without_its_commit_marker_is_refused_as_incomplete(gcs, dit, tmp_path):
    model, first, second = dit
    path = gcs.uri(tmp_path.name, "model")
    serialization.save_model(path, model, first)
    storage.path(path).joinpath("model.json").unlink()  # as a save killed after its params, before model.json
    message = f"{path} holds an incomplete model bundle: params/ without model.json"
    with pytest.raises(FileNotFoundError, match=message) as error:
        serialization.load_model(path)
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=f"sample.model_path: {message}"):
        bundles.require_bundle(path, "sample.model_path")
    with pytest.raises(ValueError, match="holds an incomplete model bundle .*; pass --overwrite"):
        serialization.save_model(path, model, second)
    serialization.save_model(path, model, second, overwrite=True)
    _assert_params(path, second)
    _assert_no_local_gs_folder()


@pytest.mark.slow
def test_sampling_to_gcs_killed_and_restarted_gives_identical_samples(gcs, dit, tmp_path):
    model, params, _ = dit
    run = tmp_path.name
    model_path = gcs.uri(run, "model")
    serialization.save_model(model_path, model, params)
    # A straight run, in this process on 8 devices.
    outputs = sampling.sample_from_config(_config(gcs.uri(run, "reference"), model_path), gcs.uri(run))
    assert outputs == {name: gcs.uri(run, "reference", file) for name, file in
                       [("grid", "grid.png"), ("samples", "samples.npz"), ("protocol", "protocol.json")]}
    assert _objects(gcs, f"{run}/reference") == ["grid.png", "protocol.json", "samples.npz"]

    # `ldm-jax sample` with a gs:// workdir (out_dir: <workdir>/samples), killed after its first chunk.
    workdir = gcs.uri(run, "work")
    flags = [f"--config.diffusion.{k}={v}" for k, v in DIFFUSION.items()] + [
        f"--config.sample.{k}={v}" for k, v in {**SAMPLE, "model_path": model_path}.items()]
    command = [sys.executable, "-m", "ldm_jax.cli", "sample", "--config=configs/dit_digits.py",
               f"--workdir={workdir}", *flags]
    env = cpu_env(8, **gcs.env, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(storage.path(gcs.uri(run, "work", "samples", "chunks", "0-8.npz")), process)
    process.kill()
    process.wait()
    written = _objects(gcs, f"{run}/work/samples")
    assert "samples.npz" not in written and "protocol.json" in written
    _upload(gcs.uri(run, "work", "samples", "chunks", "48-52.npz"), b"a damaged chunk")  # rewritten on resume
    valid = [name for name in _objects(gcs, f"{run}/work/samples/chunks") if name != "48-52.npz"]
    print("chunks written before the kill:", valid)

    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"samples: {gcs.uri(run, 'work', 'samples', 'samples.npz')}" in result.stdout
    assert f"({len(valid)} already written)" in result.stderr
    assert _objects(gcs, f"{run}/work/samples") == ["grid.png", "protocol.json", "samples.npz"]  # chunks removed
    for name in ("samples.npz", "grid.png"):
        restarted = storage.path(gcs.uri(run, "work", "samples", name)).read_bytes()
        assert restarted == storage.path(gcs.uri(run, "reference", name)).read_bytes(), name
    _assert_no_local_gs_folder()


def test_evaluate_reads_and_writes_gcs(gcs, weights, tmp_path):
    """Samples (.npz with protocol.json beside), a reference folder of PNGs and the Inception weights
    in the bucket; evaluation.json in a gs:// workdir, with the metrics of the same files on disk."""
    images = np.random.default_rng(0).integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    run = tmp_path.name
    local = {"samples": tmp_path / "samples" / "samples.npz", "reference": tmp_path / "reference"}
    local["samples"].parent.mkdir()
    local["samples"].write_bytes(_npz_bytes(arr_0=images))
    (local["samples"].parent / "protocol.json").write_text('{"seed": 3}')
    local["reference"].mkdir()
    for i, image in enumerate(images[::-1]):
        Image.fromarray(image).save(local["reference"] / f"{i:03d}.png")
    for file in [*local["samples"].parent.iterdir(), *local["reference"].iterdir()]:
        _upload(gcs.uri(run, file.parent.name, file.name), file.read_bytes())
    inception = _upload(gcs.uri(run, "inception.pth"), open(weights, "rb").read())

    on_disk, _ = fid.evaluate_from_config(
        make_config(weights, samples=str(local["samples"]), reference=str(local["reference"])), str(tmp_path),
        inception_image_size=IMAGE_SIZE)
    config = make_config(inception, samples=gcs.uri(run, "samples", "samples.npz"), reference=gcs.uri(run, "reference"))
    results, path = fid.evaluate_from_config(config, gcs.uri(run, "work"), inception_image_size=IMAGE_SIZE)
    assert path == gcs.uri(run, "work", "evaluation.json") and results == on_disk
    written = json.loads(storage.path(path).read_text())
    expected = json.loads((tmp_path / "evaluation.json").read_text())
    assert written["metrics"] == expected["metrics"] == on_disk
    protocol = written["protocol"]
    assert protocol["samples"] == {"path": gcs.uri(run, "samples", "samples.npz"),
                                   "sha256": expected["protocol"]["samples"]["sha256"]}
    assert protocol["reference"] | {"path": gcs.uri(run, "reference")} == expected["protocol"]["reference"] | {
        "path": gcs.uri(run, "reference")}  # the folder's hash: names and contents, not where it is
    assert protocol["inception"]["path"] == inception
    assert protocol["inception"]["sha256"] == expected["protocol"]["inception"]["sha256"]
    assert protocol["sampling_protocol_path"] == gcs.uri(run, "samples", "protocol.json")
    assert protocol["sampling"] == {"seed": 3}
    assert _objects(gcs, f"{run}/work") == ["evaluation.json"]
    _assert_no_local_gs_folder()
