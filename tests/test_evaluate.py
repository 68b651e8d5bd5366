"""`ldm-jax evaluate` (fid.evaluate_from_config) end to end, its bad inputs, and the DiT-XL/2 paper
evaluation config (configs/dit_xl2_imagenet256_eval.py).

The network is the tiny pytorch-fid fixture (widths / 16, 63 classes) read from its weights file as
the real one is; images are resized to 75 instead of 299 (3x3x7 spatial features), so the sFID
matrix square roots stay small.
"""
import hashlib
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm_jax.config import default_config
from ldm_jax.convert.inception import inception_from_pytorch_fid
from ldm_jax.convert.torch_io import save_safetensors
from ldm_jax.data import transforms
from ldm_jax.diffusion import sampler_plans, samplers, schedules
from ldm_jax.diffusion import objectives
from ldm_jax.evaluation import fid
from ldm_jax.evaluation.features import InceptionFeatures
from ldm_jax.models import backbones
from ldm_jax.models.inception import InceptionV3
from ldm_jax.parallel import mesh as mesh_lib
from subprocesses import ROOT, cpu_env, load_config

pytestmark = pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 24 samples, 63-128 dims

IMAGE_SIZE = 75
EVAL_CONFIG = ROOT / "configs" / "dit_xl2_imagenet256_eval.py"


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def weights(fixtures_dir):
    return str(fixtures_dir / "inception_fid_tiny.pth")


def make_config(weights, **evaluate):
    config = default_config()
    config.mesh.update(data=-1, fsdp=2)
    config.evaluate.update(inception_path=weights, batch_size=8, **evaluate)
    return config


def run(config, workdir):
    return fid.evaluate_from_config(config, str(workdir), inception_image_size=IMAGE_SIZE)


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def direct(images, weights, tmp_path_factory):
    """The library path with the same weights: `evaluate` of images vs images[::-1] (as .npz)."""
    _, params = inception_from_pytorch_fid(weights, width_divisor=16, num_classes=63)
    module = InceptionV3(width_divisor=16, num_classes=63, image_size=IMAGE_SIZE)
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 2})
    folder = tmp_path_factory.mktemp("direct")
    np.savez(folder / "samples.npz", arr_0=images)
    np.savez(folder / "ref.npz", arr_0=images[::-1])
    extractor = InceptionFeatures(module, params, batch_size=8, mesh=mesh)
    return fid.evaluate(str(folder / "samples.npz"), str(folder / "ref.npz"), extractor)


# ----------------------------------------------------------------------------- end to end


def test_default_samples_against_reference_npz_write_metrics_and_protocol(images, weights, direct, tmp_path):
    out_dir = tmp_path / "work" / "samples"  # what `ldm-jax sample` writes
    out_dir.mkdir(parents=True)
    np.savez(out_dir / "samples.npz", arr_0=images, arr_1=np.arange(24, dtype=np.int32))
    sampling_protocol = {"sampler": {"sampler": "ddpm", "num_steps": 250}, "num_samples": 24}
    (out_dir / "protocol.json").write_text(json.dumps(sampling_protocol))
    np.savez(tmp_path / "ref.npz", arr_0=images[::-1])

    results, path = run(make_config(weights, reference=str(tmp_path / "ref.npz")), tmp_path / "work")

    assert path == str(tmp_path / "work" / "evaluation.json")
    written = json.loads(open(path).read())
    assert written["metrics"] == results == direct  # the config path = the library path
    assert abs(results["fid"]) < 1e-6 and abs(results["sfid"]) < 1e-6  # the same images
    assert results["precision"] == results["recall"] == 1.0
    assert results["num_samples"] == results["num_reference_images"] == 24
    assert results["inception_score"] > 1.0
    protocol = written["protocol"]
    assert protocol["samples"] == {"path": str(out_dir / "samples.npz"), "sha256": sha256(out_dir / "samples.npz")}
    assert protocol["reference"] == {"path": str(tmp_path / "ref.npz"), "sha256": sha256(tmp_path / "ref.npz"),
                                     "statistics": "computed from its images"}
    assert protocol["inception"] == {"path": weights, "sha256": sha256(weights), "width_divisor": 16,
                                     "num_classes": 63, "image_size": IMAGE_SIZE}
    assert (protocol["num_splits"], protocol["k"], protocol["num_devices"]) == (10, 3, 8)
    assert protocol["sampling"] == sampling_protocol
    assert protocol["sampling_protocol_path"] == str(out_dir / "protocol.json")
    assert set(protocol["versions"]) >= {"ldm_jax", "jax"}


def test_folders_of_samples_and_reference_and_stored_statistics(images, weights, direct, tmp_path):
    samples = write_pngs(tmp_path / "samples", images)
    reference = write_pngs(tmp_path / "reference", images[::-1])
    results, path = run(make_config(weights, samples=str(samples), reference=str(reference)), tmp_path)
    for key, value in direct.items():  # PNG round trips are lossless: the same metrics
        assert results[key] == pytest.approx(value, abs=1e-9), key
    protocol = json.loads(open(path).read())["protocol"]
    assert protocol["samples"]["path"] == str(samples) and len(protocol["samples"]["sha256"]) == 64
    assert protocol["sampling"] is None

    # A reference with stored statistics (ADM's keys): FID from them, no precision / recall.
    module = InceptionV3(width_divisor=16, num_classes=63, image_size=IMAGE_SIZE)
    extractor = InceptionFeatures(module, inception_from_pytorch_fid(weights, width_divisor=16, num_classes=63)[1],
                                  batch_size=8, mesh=mesh_lib.make_mesh({"data": -1, "fsdp": 2}))
    fid.write_reference_npz(str(tmp_path / "stats.npz"), fid.statistics(extractor.extract(np.split(images[::-1], 3))))
    stored, _ = run(make_config(weights, samples=str(samples), reference=str(tmp_path / "stats.npz")), tmp_path)
    assert stored["fid"] == pytest.approx(0.0, abs=1e-6)
    assert stored["precision"] is stored["recall"] is stored["num_reference_images"] is None
    assert json.loads(open(path).read())["protocol"]["reference"]["statistics"] == "stored"


def test_reference_data_is_the_configs_images_center_cropped(weights, tmp_path):
    rng = np.random.default_rng(1)
    data_dir = tmp_path / "data"
    crops = []
    for c, (h, w) in enumerate([(40, 48), (48, 36)]):  # two classes, other sizes than the samples
        (data_dir / f"class{c}").mkdir(parents=True)
        for i in range(12):
            image = rng.integers(0, 256, (h, w, 3), np.uint8)
            Image.fromarray(image).save(data_dir / f"class{c}" / f"{i:02d}.png")
            crops.append(transforms.center_crop_arr(Image.fromarray(image), 32))
    np.savez(tmp_path / "samples.npz", arr_0=np.stack(crops))
    config = make_config(weights, samples=str(tmp_path / "samples.npz"), reference="data")
    config.data.update(source="image_folder", path=str(data_dir), image_size=32)
    results, path = run(config, tmp_path)
    assert abs(results["fid"]) < 1e-6 and abs(results["sfid"]) < 1e-6
    assert results["precision"] == results["recall"] == 1.0 and results["num_reference_images"] == 24
    reference = json.loads(open(path).read())["protocol"]["reference"]
    assert reference["num_images"] == 24
    assert reference["data"] == {"source": "image_folder", "name": "", "data_dir": "", "path": str(data_dir),
                                 "split": "train", "image_size": 32}


# ----------------------------------------------------------------------------- bad inputs


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _stats(pool=128, spatial=63, **changes):
    stats = dict(mu=np.zeros(pool), sigma=np.eye(pool), mu_s=np.zeros(spatial), sigma_s=np.eye(spatial))
    return {**stats, **changes}


BAD_INPUTS = {
    "default samples missing": (dict(samples=""), FileNotFoundError,
                                r"evaluate.samples is unset and .*/work/samples/samples.npz does not exist"),
    "samples missing": (dict(samples="{tmp}/nothing.npz"), FileNotFoundError,
                        r"evaluate.samples='.*/nothing.npz': no such file"),
    "samples not npz": (dict(samples="{tmp}/ref_images.npz.txt"), ValueError,
                        r"evaluate.samples='.*ref_images.npz.txt' must be a samples .npz"),
    "reference empty": (dict(reference=""), ValueError, r"evaluate.reference is empty"),
    "reference missing": (dict(reference="{tmp}/nothing"), FileNotFoundError,
                          r"evaluate.reference='.*/nothing': no such file"),
    "reference float images": (dict(reference="{tmp}/ref_float.npz"), ValueError,
                               r"ref_float.npz: 'arr_0' must be uint8 images \[N, H, W, 3\], got float32"),
    "reference misshaped stats": (dict(reference="{tmp}/ref_shape.npz"), ValueError,
                                  r"ref_shape.npz: reference 'sigma' must be a float array of shape \(128, 128\)"),
    "reference int stats": (dict(reference="{tmp}/ref_int.npz"), ValueError,
                            r"ref_int.npz: reference 'mu_s' must be a float array .* got int64"),
    "reference latents": (dict(reference="data"), ValueError,
                          r"evaluate.reference='data' needs images, but data.source='latents'"),
    "weights unset": (dict(inception_path=""), ValueError, r"evaluate.inception_path is empty"),
    "weights missing": (dict(inception_path="{tmp}/nothing.pth"), FileNotFoundError,
                        r"evaluate.inception_path='.*/nothing.pth': no such file"),
    "weights of another network": (dict(inception_path="{tmp}/other.safetensors"), ValueError,
                                   r"evaluate.inception_path='.*other.safetensors': no 'fc.weight'"),
    "batch size": (dict(batch_size=6), ValueError,
                   r"evaluate.batch_size=6 must be a positive multiple of the mesh's 8 devices"),
    "one sample": (dict(samples="{tmp}/one.npz"), ValueError,
                   r"one.npz \(arr_0\): 1 sample\(s\); FID and sFID need at least 2"),
    "too few for IS": (dict(num_splits=13), ValueError,
                       r"24 samples are too few for the Inception Score in num_splits=13 parts "
                       r"\(evaluate.num_splits\): it needs at least 26"),
    "too few for P/R": (dict(reference="{tmp}/ref_three.npz"), ValueError,
                        r"precision/recall with k=3 \(evaluate.k\) need more than 3 .* "
                        r"got 24 samples .* and 3 reference"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_named_before_any_feature_is_computed(case, images, weights, tmp_path, caplog):
    fields, error, match = BAD_INPUTS[case]
    workdir = tmp_path / "work"
    samples = _npz(tmp_path / "samples.npz", arr_0=images)
    _npz(tmp_path / "one.npz", arr_0=images[:1])
    _npz(tmp_path / "ref_images.npz", arr_0=images)
    (tmp_path / "ref_images.npz.txt").write_text("")
    _npz(tmp_path / "ref_float.npz", arr_0=images.astype(np.float32))
    _npz(tmp_path / "ref_shape.npz", **_stats(sigma=np.eye(128)[:, :127]))
    _npz(tmp_path / "ref_int.npz", **_stats(mu_s=np.zeros(63, np.int64)))
    _npz(tmp_path / "ref_three.npz", arr_0=images[:3])
    save_safetensors({"conv.weight": np.zeros((4, 3, 3, 3), np.float32)}, tmp_path / "other.safetensors")
    config = make_config(weights, samples=samples, reference=str(tmp_path / "ref_images.npz"))
    config.evaluate.update({k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in fields.items()})
    config.data.source = "latents"
    with caplog.at_level(logging.INFO), pytest.raises(error, match=match):
        run(config, workdir)
    assert not [r for r in caplog.records if "Inception features" in r.getMessage()]
    assert not (workdir / "evaluation.json").exists()


def _cli(tmp_path, *flags):
    command = [sys.executable, "-m", "ldm_jax.cli", "evaluate", f"--config={EVAL_CONFIG}",
               f"--workdir={tmp_path}", *flags]
    return subprocess.run(command, cwd=ROOT, env=cpu_env(2), capture_output=True, text=True, timeout=300)


def test_cli_reports_a_missing_weights_file_and_a_mistyped_field_in_one_line(images, tmp_path):
    samples = _npz(tmp_path / "samples.npz", arr_0=images)
    missing = tmp_path / "pt_inception.pth"
    result = _cli(tmp_path, f"--config.evaluate.samples={samples}", f"--config.evaluate.reference={samples}",
                  f"--config.evaluate.inception_path={missing}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"ldm-jax evaluate: error: FileNotFoundError: evaluate.inception_path='{missing}': no such file"
    ]
    result = _cli(tmp_path, f"--config.evaluate.inception_pth={missing}")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "inception_pth" in lines[0], result.stderr


# ----------------------------------------------------------------------------- the paper's config


def test_eval_config_pins_dits_protocol_and_builds():
    config = load_config("dit_xl2_imagenet256_eval")
    model = backbones.backbone_from_config(config.model)
    shape = (model.input_size, model.patch_size, model.in_channels, model.hidden_size, model.depth)
    assert shape == (32, 2, 4, 1152, 28)
    assert model.learn_sigma and model.num_classes == 1000
    assert config.data.latent_norm == "vae"  # sd-vae-ft-ema's own scaling_factor, 0.18215
    s = config.sample
    assert (s.num_samples, s.labels, s.guidance_scale, s.guided_channels) == (50_000, "random", 1.5, 3)
    assert (config.evaluate.num_splits, config.evaluate.k) == (10, 3)

    objective = objectives.objective_from_config(config.diffusion, learn_sigma=model.learn_sigma)
    sampler = objectives.sampler_from_config(config.sample, objective)
    assert (sampler.sampler, sampler.num_steps, sampler.prediction, sampler.variance) == (
        "ddpm", 250, "epsilon", "learned_range")
    # DiT samples with ADM's SpacedDiffusion(space_timesteps(1000, "250")): the same 250 steps,
    # denoiser times and per-step coefficients, to the bit.
    full = schedules.discrete_schedule("linear", 1000)
    spaced = schedules.respace(full, schedules.space_timesteps(1000, "250"))
    ours = sampler_plans.make_plan(objective.schedule, sampler)
    adm = sampler_plans.make_plan(spaced, samplers.SamplerConfig("ddpm", 250, variance="learned_range"))
    assert ours.keys() == adm.keys() and len(ours["model_t"]) == 250
    for key in ours:
        np.testing.assert_array_equal(ours[key], adm[key], err_msg=key)
