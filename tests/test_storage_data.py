"""gs:// data against a real GCS emulator (`gcs` fixture): image folders, latent caches written and
read in a bucket (resumed after a failure and after kill -9), and `convert` from and to gs://."""
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from ldm_jax import storage
from ldm_jax.convert import vae as vae_convert
from ldm_jax.convert.registry import IMPORTERS
from ldm_jax.data import latent_cache
from ldm_jax.data import pipeline
from ldm_jax.data import sources
from ldm_jax.models import serialization
from ldm_jax.models.vae import AutoencoderKL
from subprocesses import cpu_env, wait_for
from test_latent_cache import FACTOR, FailingAt, encode_fn

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE_SIZE, SHARD = 8, 64


def _no_local_gs_folder(*folders):
    """No `gs:` folder was made by abspath-ing a URI, in the repo root or the given working folders."""
    for folder in (ROOT, pathlib.Path.cwd(), *folders):
        assert not (pathlib.Path(folder) / "gs:").exists(), folder


def _upload(local: pathlib.Path, uri: str) -> None:
    """Copies every file under the local folder `local` to the same names under `uri`."""
    for file in local.rglob("*"):
        if file.is_file():
            storage.path(uri).joinpath(*file.relative_to(local).parts).write_bytes(file.read_bytes())


def _names(uri: str) -> list[str]:
    """The sorted names directly under `uri`."""
    return sorted(p.name for p in storage.path(uri).iterdir())


def _image(path: pathlib.Path, value: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 5, 3), value, np.uint8)).save(path, format=fmt)


def _elements(source):
    return [{k: np.asarray(v) if k == "image" else v for k, v in source[i].items()} for i in range(len(source))]


def _assert_same_source(remote, local):
    assert len(remote) == len(local) and remote.class_names == local.class_names
    for got, want in zip(_elements(remote), _elements(local)):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_image_folders_on_gcs_read_as_the_local_ones(tmp_path, gcs):
    classes = tmp_path / "classes"
    for name, value in {"zebra": 30, "ant": 10, "mole": 20}.items():
        _image(classes / name / "x.png", value)
    _image(classes / "mole" / "deeper" / "y.jpg", 40, fmt="JPEG")
    _image(classes / "mole" / "b.png", 50)  # after mole/'s own files come its sub-folders' (os.walk order)
    _image(classes / "ant" / ".hidden" / "z.png", 60)
    (classes / "ant" / "notes.txt").write_text("not an image")
    (classes / "ant" / "broken.png").write_bytes(b"not a png")
    captions = tmp_path / "captions"
    for name, value in {"cat": 10, "dog": 200}.items():
        _image(captions / f"{name}.png", value)
        (captions / f"{name}.txt").write_text(f"a {name}\n")
    _upload(classes, gcs.uri("images", "classes"))
    _upload(captions, gcs.uri("images", "captions"))

    remote = sources.ImageFolderSource(gcs.uri("images", "classes"))
    local = sources.ImageFolderSource(str(classes))
    _assert_same_source(remote, local)
    assert remote.class_names == ("ant", "mole", "zebra") and len(remote) == 5
    assert [f.split("/classes/")[1] for f in remote.files] == [f.split("/classes/")[1] for f in local.files]
    assert remote.skipped == [gcs.uri("images", "classes", "ant", "broken.png")]
    with pytest.raises(ValueError, match=r"cannot read image gs://ldm-test/images/classes/ant/broken\.png"):
        sources.ImageFolderSource(gcs.uri("images", "classes"), check_images=False)[0]
    remote, local = sources.ImageFolderSource(gcs.uri("images", "captions")), sources.ImageFolderSource(str(captions))
    _assert_same_source(remote, local)
    assert [e["caption"] for e in _elements(remote)] == ["a cat", "a dog"]

    storage.path(gcs.uri("images", "captions", "dog.txt")).unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) have no caption .txt beside them.*captions/dog\.png"):
        sources.ImageFolderSource(gcs.uri("images", "captions"))
    with pytest.raises(ValueError, match="is not an existing folder"):
        sources.ImageFolderSource(gcs.uri("images", "nothing"))
    _no_local_gs_folder()


def _cache(source, out_dir):
    return latent_cache.cache_latents(source, encode_fn, out_dir, image_size=IMAGE_SIZE, downsample_factor=FACTOR,
                                      batch_size=16, shard_size=SHARD)


def _assert_same_cache(remote, local):
    """Two latent caches hold the same records and statistics, and the pipeline batches them alike."""
    remote_source, local_source = sources.LatentSource(remote), sources.LatentSource(local)
    assert len(remote_source) == len(local_source)
    for i in range(len(local_source)):
        got, want = remote_source[i], local_source[i]
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    for got, want in zip(remote_source.channel_stats(), local_source.channel_stats()):
        np.testing.assert_array_equal(got, want)
    sharding = pipeline.batch_sharding(jax.make_mesh((jax.device_count(), 1, 1), ("data", "fsdp", "tensor"),
                                                     axis_types=(jax.sharding.AxisType.Auto,) * 3))
    iterators = []
    for cache in (remote, local):
        config = pipeline.default_config()
        config.update(dict(source="latents", path=cache, batch_size=16, shuffle=True, num_threads=2,
                           latent_norm="channel"))
        iterators.append(pipeline.make_pipeline(config, sharding))
    for _ in range(3):
        got, want = (next(iterator) for iterator in iterators)
        np.testing.assert_array_equal(np.asarray(got["latent"]), np.asarray(want["latent"]))


def test_latent_cache_in_a_bucket_resumes_and_reads_as_a_local_one(tmp_path, gcs):
    digits = sources.DigitsSource("test")  # 300 examples: shards of 64, 64, 64, 64, 44
    uri = gcs.uri("latents", "in_process")
    with pytest.raises(RuntimeError, match="killed"):
        _cache(FailingAt(digits, fail_at=150), uri)
    shards = [os.path.basename(sources.latent_shard_path("", k, 5)) for k in range(5)]
    # Shards 0 and 1 are published with their sums; the failed shard 2 left nothing in the bucket.
    assert _names(uri) == sorted([sources.LATENT_META, *shards[:2], *(s + ".json" for s in shards[:2])])
    with pytest.raises(ValueError, match="incomplete: 3 of 5 shards"):
        sources.LatentSource(uri)
    resumed = FailingAt(digits, fail_at=-1)
    _cache(resumed, uri)
    assert min(i for i in resumed.reads if i > 0) == 2 * SHARD  # the published shards were not redone
    assert _names(uri) == sorted([sources.LATENT_META, *shards, *(s + ".json" for s in shards)])
    _cache(digits, str(tmp_path / "local"))
    _assert_same_cache(uri, str(tmp_path / "local"))
    _no_local_gs_folder()


def test_captioned_images_and_text_encoder_in_a_bucket_cache_as_local_ones(tmp_path, gcs, fixtures_dir):
    from ldm_jax.conditioning import text_encoding
    from sections import section

    images = tmp_path / "captioned"
    for i in range(8):
        _image(images / f"{i}.png", 30 * i)
        (images / f"{i}.txt").write_text(f"caption {i}")
    _upload(images, gcs.uri("t2i", "captioned"))
    _upload(fixtures_dir / "clip_tiny", gcs.uri("t2i", "clip_tiny"))
    caches = {}
    places = {"remote": (gcs.uri("t2i"), gcs.uri("t2i", "clip_tiny")),
              "local": (str(tmp_path), fixtures_dir / "clip_tiny")}
    for name, (folder, clip) in places.items():
        text = text_encoding.text_encoder_from_config(section(
            "text", encoder_path=storage.join(clip, "text_encoder"), tokenizer_path=storage.join(clip, "tokenizer"),
            max_length=8))
        caches[name] = storage.join(folder, "cache")
        latent_cache.cache_latents(sources.ImageFolderSource(storage.join(folder, "captioned")), encode_fn,
                                   caches[name], image_size=4, downsample_factor=FACTOR, batch_size=8, text=text)
    remote, local = sources.LatentSource(caches["remote"]), sources.LatentSource(caches["local"])
    assert remote.meta["text"] == local.meta["text"] and len(remote) == len(local) == 8
    for i in range(8):
        jax.tree.map(np.testing.assert_array_equal, remote[i], local[i])
    jax.tree.map(np.testing.assert_array_equal, remote.empty_caption(), local.empty_caption())
    _no_local_gs_folder()


def _tiny_vae_bundle(folder):
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    params = serialization.nn.unbox(jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
    serialization.save_model(folder, vae, params)


def _encode_command(vae, out):
    return [sys.executable, "-m", "ldm_jax.cli", "encode", f"--config={ROOT / 'configs' / 'dit_digits.py'}",
            f"--config.vae.path={vae}", "--config.data.batch_size=16", "--config.data.random_flip=False",
            f"--out={out}", "--shard_size=128"]


@pytest.mark.slow
def test_encode_command_killed_and_rerun_fills_a_bucket_cache_as_a_local_one(tmp_path, gcs):
    _tiny_vae_bundle(tmp_path / "vae")
    uri, env = gcs.uri("latents", "cli"), cpu_env(1, **gcs.env)
    first = subprocess.Popen(_encode_command(tmp_path / "vae", uri), cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shard = storage.path(sources.latent_shard_path(uri, 0, 12))  # 1,497 training digits
    wait_for(shard, first)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert not [n for n in _names(uri) if "tmp" in n]
    rerun = subprocess.run(_encode_command(tmp_path / "vae", uri), cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done = re.search(r"writes 12 of 12 shards \((\d+) already done\)", rerun.stderr)
    assert done and 1 <= int(done.group(1)) < 12, rerun.stderr[-3000:]  # resumed after the published shards
    assert f"--config.data.path={uri}" in rerun.stdout
    local = subprocess.run(_encode_command(tmp_path / "vae", tmp_path / "local"), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, local.stderr[-3000:]
    _assert_same_cache(uri, str(tmp_path / "local"))
    _no_local_gs_folder(tmp_path)


IMPORTS = {  # each importer of convert/registry.py that reads a folder, on its committed fixture
    "vae_diffusers": "vae_tiny_diffusers",
    "dit_diffusers": "dit_tiny_diffusers",
    "pixart_diffusers": "pixart_tiny_diffusers",
    "clip_transformers": "clip_tiny/text_encoder",
    "unet_diffusers": "unet_sd1",
}


def test_importers_read_gcs_folders_and_torch_files(gcs, fixtures_dir):
    from ldm_jax.convert import torch_io

    for name, fixture in IMPORTS.items():
        uri = gcs.uri("weights", fixture)
        _upload(fixtures_dir / fixture, uri)
        module, params = IMPORTERS[name].load(uri, {})
        want_module, want = IMPORTERS[name].load(str(fixtures_dir / fixture), {})
        assert module == want_module
        jax.tree.map(np.testing.assert_array_equal, params, want)
    for fixture in ("dit_tiny_official.pt", "vae_tiny_ldm.ckpt"):  # torch zip checkpoints
        uri = gcs.uri("weights", fixture)
        storage.path(uri).write_bytes((fixtures_dir / fixture).read_bytes())
        got, want = torch_io.load_state_dict(uri), torch_io.load_state_dict(fixtures_dir / fixture)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    storage.path(gcs.uri("weights", "short.safetensors")).write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=r"^gs://ldm-test/weights/short\.safetensors: not a safetensors file"):
        torch_io.load_state_dict(gcs.uri("weights", "short.safetensors"))
    with pytest.raises(FileNotFoundError, match="gs://ldm-test/weights/none.pt"):
        torch_io.load_state_dict(gcs.uri("weights", "none.pt"))
    _no_local_gs_folder()


def test_vae_export_to_a_bucket_reads_back_and_never_replaces_other_files(gcs, fixtures_dir):
    module, params = vae_convert.vae_from_diffusers(fixtures_dir / "vae_tiny_diffusers")
    uri = gcs.uri("export", "vae")
    vae_convert.vae_to_diffusers(module, params, uri)
    assert _names(uri) == sorted(["config.json", "diffusion_pytorch_model.safetensors"])
    round_trip_module, round_trip = vae_convert.vae_from_diffusers(uri)
    assert round_trip_module == module
    jax.tree.map(np.testing.assert_array_equal, round_trip, params)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        vae_convert.vae_to_diffusers(module, params, uri)
    vae_convert.vae_to_diffusers(module, params, uri, overwrite=True)
    storage.path(uri).joinpath("notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        vae_convert.vae_to_diffusers(module, params, uri, overwrite=True)
    assert storage.path(uri).joinpath("notes.txt").read_text() == "mine"
    _no_local_gs_folder()


@pytest.mark.slow
def test_convert_command_from_and_to_a_bucket(tmp_path, gcs, fixtures_dir):
    src, out = gcs.uri("cli", "vae_tiny_diffusers"), gcs.uri("cli", "bundle")
    _upload(fixtures_dir / "vae_tiny_diffusers", src)
    result = subprocess.run([sys.executable, "-m", "ldm_jax.cli", "convert", "--from=vae_diffusers", f"--src={src}",
                             f"--out={out}"], cwd=tmp_path, env=cpu_env(1, **gcs.env), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    module, params, metadata = serialization.load_model(out)
    assert metadata["source"] == src and metadata["format"] == "vae_diffusers"
    want_module, want = vae_convert.vae_from_diffusers(fixtures_dir / "vae_tiny_diffusers")
    assert module == want_module
    jax.tree.map(np.testing.assert_array_equal, params, want)
    _no_local_gs_folder(tmp_path)


def test_objects_another_process_writes_are_seen_after_a_listing(gcs):
    from google.cloud import storage as gcs_client

    storage.path(gcs.uri("seen", "a")).write_bytes(b"a")
    assert _names(gcs.uri("seen")) == ["a"]  # a listing, which gcsfs would cache
    gcs_client.Client(project="test").bucket(gcs.bucket).blob("seen/b").upload_from_string(b"b")  # another writer
    assert storage.path(gcs.uri("seen", "b")).is_file()


def test_tfds_data_dir_in_a_bucket_is_passed_through(tmp_path, gcs):
    from test_data_sources import LdmJaxTinyImages  # a tiny TFDS dataset of our own

    LdmJaxTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    _upload(tmp_path, gcs.uri("tfds"))
    config = dict(source="tfds", name="ldm_jax_tiny_images", image_key="picture", label_key="kind")
    remote = pipeline.make_source(pipeline.resolve_config(dict(config, data_dir=gcs.uri("tfds"))))
    local = pipeline.make_source(pipeline.resolve_config(dict(config, data_dir=str(tmp_path))))
    assert len(remote) == 7
    _assert_same_source(remote, local)
    _no_local_gs_folder()
