"""Bad input to the `ldm-jax` commands, as users give it: each is refused with one line on stderr,
`ldm-jax COMMAND: error: ...`, naming the file or field, and no traceback (docs/troubleshooting.md
lists them). Most cases run the command in this process, as the console script does (`ldm_jax`
below); a few representative ones in a real subprocess (`ldm_jax_subprocess`)."""
import json
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from ldm_jax import cli
from ldm_jax.convert.dit import dit_from_diffusers
from ldm_jax.convert.vae import vae_from_diffusers
from ldm_jax.models import serialization
from subprocesses import ROOT, cpu_env

pytestmark = pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # a few samples, many dims

EVAL_CONFIG = "configs/dit_xl2_imagenet256_eval.py"
LOG_LINE = re.compile(r"^[IWEF]\d{4} ")  # absl's log lines: the only other lines a failed command may print


def ldm_jax(*args, monkeypatch, traceback=False):
    """Runs `ldm-jax ARGS` in this process as `cli.run` does (its flags parsed, then `cli.main`), with
    LDM_JAX_TRACEBACK set when `traceback`; returns the message it exits with (what Python prints to
    stderr), None when it succeeds."""
    argv = ["ldm-jax", *args]
    monkeypatch.setattr(sys, "argv", argv)  # _parse_flags sets it
    if traceback:
        monkeypatch.setenv("LDM_JAX_TRACEBACK", "1")
    else:
        monkeypatch.delenv("LDM_JAX_TRACEBACK", raising=False)
    cli.FLAGS.unparse_flags()  # flags a previous command set go back to their defaults
    for name in [name for name in cli.FLAGS if name.startswith("config.")]:
        delattr(cli.FLAGS, name)  # the overrides a config file defines as it is parsed: defined again below
    try:
        cli.main(cli._parse_flags(argv))
    except SystemExit as exit:
        assert exit.code not in (0, None), f"exited with {exit.code!r}"
        return exit.code
    return None


def one_line_error(message, command, *names):
    """Checks that `message` is one line, `ldm-jax COMMAND: error: ...`, naming each of `names`."""
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"ldm-jax {command}: error: "), message
    for name in names:
        assert str(name) in message, (name, message)
    return message


def ldm_jax_subprocess(*args):
    """Runs `ldm-jax ARGS` in a subprocess; returns its one-line error after checking that it failed,
    printed no traceback and nothing but log lines before it."""
    result = subprocess.run([sys.executable, "-m", "ldm_jax.cli", *args], cwd=ROOT, env=cpu_env(2),
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines and all(LOG_LINE.match(line) for line in lines[:-1]), result.stderr[-3000:]
    return lines[-1]


# ----------------------------------------------------------------------------- convert


def _safetensors_bytes(header):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


MALFORMED_SAFETENSORS = {
    "empty": (b"", "0 bytes, too short for a header"),
    "short": (b"\x01\x02\x03", "3 bytes, too short for a header"),
    "header length past the end": (struct.pack("<Q", 10**6) + b"{}", "header length 1000000 runs past the end"),
    "header not an object": (_safetensors_bytes([1, 2]), "header is a JSON list, not an object"),
    "tensor without dtype": (_safetensors_bytes({"w": {"shape": [1], "data_offsets": [0, 4]}}) + bytes(4),
                             "tensor 'w': expected an object with dtype, shape and data_offsets"),
}


@pytest.mark.parametrize("case", list(MALFORMED_SAFETENSORS))
def test_convert_names_a_malformed_safetensors_file(case, tmp_path, fixtures_dir, monkeypatch):
    content, reason = MALFORMED_SAFETENSORS[case]
    source = tmp_path / "vae"
    shutil.copytree(fixtures_dir / "vae_tiny_diffusers", source)
    weights = source / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(content)
    error = ldm_jax("convert", "--from=vae_diffusers", f"--src={source}", f"--out={tmp_path / 'bundle'}",
                    monkeypatch=monkeypatch)
    one_line_error(error, "convert", weights, reason)
    assert not (tmp_path / "bundle").exists()


def _unsafe_checkpoint(path, marker):
    """A torch-style zip whose pickle would create the folder `marker` when unpickled by torch.load."""

    class Payload:
        def __reduce__(self):
            return (__import__("os").mkdir, (str(marker),))

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"model": Payload()}))
    return path


def _checkpoint_without_storages(fixtures_dir, path):
    """The official DiT fixture without its data/ entries (the storages its pickle refers to)."""
    with zipfile.ZipFile(fixtures_dir / "dit_tiny_official.pt") as source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            if "/data/" not in info.filename:
                archive.writestr(info, source.read(info))
    return path


def test_convert_names_an_unsafe_pickle_and_a_zip_without_its_storages(tmp_path, fixtures_dir, monkeypatch):
    marker = tmp_path / "code_ran"
    unsafe = _unsafe_checkpoint(tmp_path / "unsafe.pt", marker)
    error = ldm_jax("convert", "--from=dit_official", f"--src={unsafe}", f"--out={tmp_path / 'a'}",
                    monkeypatch=monkeypatch)
    one_line_error(error, "convert", unsafe, "UnsafeCheckpointError", "refusing to unpickle global")
    assert not marker.exists()
    incomplete = _checkpoint_without_storages(fixtures_dir, tmp_path / "incomplete.pt")
    error = ldm_jax("convert", "--from=dit_official", f"--src={incomplete}", f"--out={tmp_path / 'b'}",
                    monkeypatch=monkeypatch)
    one_line_error(error, "convert", incomplete, "the archive has no entry 'dit_tiny_official/data/0'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unsafe_pickle_in_a_subprocess(tmp_path, fixtures_dir):
    marker = tmp_path / "code_ran"
    source = tmp_path / "vae"
    shutil.copytree(fixtures_dir / "vae_tiny_diffusers", source)
    (source / "diffusion_pytorch_model.safetensors").unlink()
    weights = _unsafe_checkpoint(source / "diffusion_pytorch_model.bin", marker)
    error = ldm_jax_subprocess("convert", "--from=vae_diffusers", f"--src={source}", f"--out={tmp_path / 'bundle'}")
    one_line_error(error, "convert", weights, "refusing to unpickle global 'posix.mkdir'")
    assert not marker.exists() and not (tmp_path / "bundle").exists()


# ----------------------------------------------------------------------------- model bundles


@pytest.fixture(scope="module")
def dit_bundle(tmp_path_factory, fixtures_dir):
    path = tmp_path_factory.mktemp("bundles") / "dit"
    serialization.save_model(path, *dit_from_diffusers(fixtures_dir / "dit_tiny_diffusers"))
    return path


@pytest.fixture(scope="module")
def vae_bundle(tmp_path_factory, fixtures_dir):
    path = tmp_path_factory.mktemp("bundles") / "vae"
    serialization.save_model(path, *vae_from_diffusers(fixtures_dir / "vae_tiny_diffusers"))
    return path


def _encode(vae, out, *flags, monkeypatch):
    return ldm_jax("encode", "--config=configs/dit_digits.py", f"--config.vae.path={vae}", "--config.data.split=test",
                   "--config.data.batch_size=8", f"--out={out}", *flags, monkeypatch=monkeypatch)


def test_encode_names_a_dit_bundle_given_as_the_vae(dit_bundle, tmp_path, monkeypatch):
    error = _encode(dit_bundle, tmp_path / "latents", monkeypatch=monkeypatch)
    one_line_error(error, "encode", f"vae.path={dit_bundle} holds a DiT bundle, not an AutoencoderKL")
    assert not (tmp_path / "latents").exists()


def test_a_bundle_whose_model_json_has_an_unknown_field_is_named(vae_bundle, tmp_path, monkeypatch):
    bundle = tmp_path / "vae"
    shutil.copytree(vae_bundle, bundle)
    spec = json.loads((bundle / "model.json").read_text())
    spec["config"]["warp_factor"] = 9
    (bundle / "model.json").write_text(json.dumps(spec))
    error = _encode(bundle, tmp_path / "latents", monkeypatch=monkeypatch)
    one_line_error(error, "encode", bundle / "model.json", "warp_factor")
    error = ldm_jax("convert", "--to=vae_diffusers", f"--src={bundle}", f"--out={tmp_path / 'exported'}",
                    monkeypatch=monkeypatch)
    one_line_error(error, "convert", bundle / "model.json", "warp_factor")


# ----------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)


def _evaluate(samples, reference, fixtures_dir, workdir, *, monkeypatch):
    return ldm_jax("evaluate", f"--config={EVAL_CONFIG}", f"--workdir={workdir}",
                   f"--config.evaluate.samples={samples}", f"--config.evaluate.reference={reference}",
                   f"--config.evaluate.inception_path={fixtures_dir / 'inception_fid_tiny.pth'}",
                   "--config.evaluate.batch_size=8", "--config.evaluate.num_splits=1", "--config.evaluate.k=1",
                   monkeypatch=monkeypatch)


def _truncated(good):
    return good[: len(good) // 2]


def _csv(good):
    return b"mu,sigma\n0,1\n"


NPZ_CASES = {  # (which of samples / reference is bad, its bytes made from a good .npz's)
    "truncated reference": ("reference", _truncated),
    "reference not an npz": ("reference", _csv),
    "truncated samples": ("samples", _truncated),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_evaluate_names_a_damaged_npz(case, images, fixtures_dir, tmp_path, monkeypatch):
    which, content = NPZ_CASES[case]
    np.savez(tmp_path / "good.npz", arr_0=images)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content((tmp_path / "good.npz").read_bytes()))
    files = {"samples": tmp_path / "good.npz", "reference": tmp_path / "good.npz", which: bad}
    error = _evaluate(files["samples"], files["reference"], fixtures_dir, tmp_path / "work", monkeypatch=monkeypatch)
    one_line_error(error, "evaluate", bad, "not a readable .npz file")
    assert not (tmp_path / "work" / "evaluation.json").exists()


def test_evaluate_names_a_non_npz_reference_in_a_subprocess(images, fixtures_dir, tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=images)
    reference = tmp_path / "reference.npz"
    Image.fromarray(images[0]).save(reference, format="PNG")
    error = ldm_jax_subprocess("evaluate", f"--config={EVAL_CONFIG}", f"--workdir={tmp_path}",
                               f"--config.evaluate.samples={tmp_path / 'samples.npz'}",
                               f"--config.evaluate.reference={reference}",
                               f"--config.evaluate.inception_path={fixtures_dir / 'inception_fid_tiny.pth'}")
    one_line_error(error, "evaluate", reference, "not a readable .npz file (BadZipFile")


def _png_header(side):
    """A PNG declaring `side` x `side` 1-bit pixels, with no pixel data: PIL reads its size on open."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _image_folder(folder, images, bad_name, bad_content):
    """PNGs of `images` in `folder`, and the file `bad_name` holding `bad_content`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    (folder / bad_name).write_bytes(bad_content)
    return folder / bad_name


BAD_IMAGES = {  # name -> (its bytes, what the error says)
    # beyond 2 x Image.MAX_IMAGE_PIXELS PIL refuses it; between 1x and 2x it only warns
    "decompression bomb": (_png_header(20_000), "DecompressionBombError"),
    "decompression bomb PIL only warns about": (_png_header(10_000), "DecompressionBombWarning"),
    "not an image": (b"GIF89a, or so it says", "cannot identify image file"),
}


@pytest.mark.slow  # each computes the samples' features before it reads the reference
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_evaluate_names_a_bad_image_in_the_reference_folder(case, images, fixtures_dir, tmp_path, monkeypatch):
    content, reason = BAD_IMAGES[case]
    np.savez(tmp_path / "samples.npz", arr_0=images)
    bad = _image_folder(tmp_path / "reference", images, "zz.png", content)
    error = _evaluate(tmp_path / "samples.npz", tmp_path / "reference", fixtures_dir, tmp_path / "work",
                      monkeypatch=monkeypatch)
    one_line_error(error, "evaluate", f"cannot read image {bad}", reason)


# ----------------------------------------------------------------------------- image folders


def _encode_folder(vae_bundle, folder, out, *flags, monkeypatch):
    return _encode(vae_bundle, out, "--config.data.source=image_folder", f"--config.data.path={folder}",
                   "--config.data.image_size=16", "--config.data.random_flip=False", *flags, monkeypatch=monkeypatch)


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_strict_image_folder_stops_at_a_bad_file(case, vae_bundle, images, tmp_path, monkeypatch):
    content, reason = BAD_IMAGES[case]
    bad = _image_folder(tmp_path / "data" / "cats", images, "zz.png", content)
    error = _encode_folder(vae_bundle, tmp_path / "data", tmp_path / "latents", "--config.data.strict=True",
                           monkeypatch=monkeypatch)
    one_line_error(error, "encode", "1 unreadable image(s)", bad, reason)
    assert not (tmp_path / "latents").exists()


def test_image_folder_skips_a_bad_file_with_a_warning_or_stops_when_it_is_read(
        vae_bundle, images, tmp_path, monkeypatch, caplog):
    bad = _image_folder(tmp_path / "data" / "cats", images, "zz.png", b"not an image")
    assert _encode_folder(vae_bundle, tmp_path / "data", tmp_path / "latents", monkeypatch=monkeypatch) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and str(bad) in warnings[0], warnings
    assert json.loads((tmp_path / "latents" / "meta.json").read_text())["num_examples"] == len(images)
    error = _encode_folder(vae_bundle, tmp_path / "data", tmp_path / "unchecked", "--config.data.check_images=False",
                           monkeypatch=monkeypatch)
    one_line_error(error, "encode", f"cannot read image {bad}")


# ----------------------------------------------------------------------------- the whole error


def test_ldm_jax_traceback_shows_the_whole_error(dit_bundle, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="holds a DiT bundle, not an AutoencoderKL"):
        ldm_jax("encode", "--config=configs/dit_digits.py", f"--config.vae.path={dit_bundle}",
                f"--out={tmp_path / 'latents'}", monkeypatch=monkeypatch, traceback=True)
