"""Image tasks: random inpainting masks in the data pipeline, the inpainting and super-resolution
conditions (image_tasks), their config checks, and `ldm-jax sample --image/--mask/--task`
with its errors. The trained acceptance runs: tests/test_upscaling_trained.py, test_inpainting_trained.py."""
import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bundles import random_params
from ldm_jax.conditioning import image_tasks
from ldm_jax.conditioning.image_tasks import ImageTask
from ldm_jax.data import pipeline, transforms
from ldm_jax.diffusion import samplers, schedules
from ldm_jax.inference import generation, sampling
from ldm_jax.models import serialization
from ldm_jax.models.dit import DiT
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.parallel.mesh import make_mesh
from ldm_jax.training import tasks
from sections import section
from subprocesses import ROOT, cpu_env, load_config

PIXEL_DIT = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=4, learn_sigma=False)


# --- masks in the data pipeline ------------------------------------------------------------------


def test_boxes_and_strokes_are_holes_of_the_promised_sizes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        box = transforms.random_box(rng, 16)
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        assert box.sum() == len(rows) * len(cols)  # one solid rectangle
        assert 4 <= len(rows) <= 16 and 4 <= len(cols) <= 16
        strokes = transforms.random_strokes(rng, 16)
        assert strokes.dtype == bool and 0 < strokes.mean() < 1


def _mask_batches(**data):
    config = load_config("inpaint_digits").data
    config.update(batch_size=16, **data)
    mesh = make_mesh({"data": 8})
    return pipeline.make_pipeline(config, pipeline.batch_sharding(mesh))


def test_the_pipeline_adds_one_random_mask_per_image_and_resumes_exactly():
    data = _mask_batches()
    batch = next(data)
    mask = np.asarray(batch["mask"])
    assert mask.shape == (16, 16, 16, 1) and set(np.unique(mask)) <= {0.0, 1.0}
    assert batch["image"].shape == (16, 16, 16, 3)
    assert len({m.tobytes() for m in mask}) == 16  # every image its own mask
    state = data.get_state()
    expected = np.asarray(next(data)["mask"])
    resumed = _mask_batches()
    resumed.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(resumed)["mask"]), expected)


@pytest.mark.parametrize("change, message", [
    (dict(inpaint_masks=("box", "circle")), r"data.inpaint_masks=\('box', 'circle'\): unknown kind\(s\) \['circle'\]"),
    (dict(inpaint_masks=("box",), source="latents"), "data.inpaint_masks: masks are drawn on images"),
])
def test_mask_config_errors_name_the_field(change, message):
    config = pipeline.default_config()
    config.update(change)
    with pytest.raises(ValueError, match=message):
        pipeline.resolve_config(config)


# --- the conditions -------------------------------------------------------------------------------


def test_hole_on_grid_marks_a_cell_with_any_hole_pixel():
    mask = np.zeros((1, 4, 4, 1), np.float32)
    mask[0, 0, 1] = 1.0  # one pixel of cell (0, 0)
    mask[0, 2:, 2:] = 1.0  # all of cell (1, 1)
    np.testing.assert_array_equal(image_tasks.hole_on_grid(jnp.asarray(mask), 2, 2)[0, ..., 0],
                                  [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="not a multiple of the latent grid 3x3"):
        image_tasks.hole_on_grid(jnp.asarray(mask), 3, 3)


def test_downsample_is_the_block_mean_and_names_a_size_that_does_not_divide():
    images = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    expected = images.reshape(2, 2, 4, 2, 4, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(image_tasks.downsample(jnp.asarray(images), 2), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="image_task.low_res_size=3 does not divide the 8x8 images"):
        image_tasks.downsample(jnp.asarray(images), 3)


def test_noise_augmentation_follows_the_linear_ddpm_schedule():
    low = np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
    noise = np.random.default_rng(1).standard_normal(low.shape).astype(np.float32)
    levels = np.array([0, 20, 350])
    cond = image_tasks.upscale_conditions(jnp.asarray(low), jnp.asarray(levels), jnp.asarray(noise))
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # DDPM's linear schedule, in float64
    alpha_bar = np.cumprod(1.0 - betas)[levels][:, None, None, None]
    expected = np.sqrt(alpha_bar) * low + np.sqrt(1.0 - alpha_bar) * noise
    np.testing.assert_allclose(cond["concat"], expected, atol=2e-6)
    np.testing.assert_array_equal(cond["noise_level"], levels.astype(np.float32))


def test_inpainting_conditions_are_the_hole_and_the_encoded_masked_image():
    images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    mask = np.zeros((2, 8, 8, 1), np.float32)
    mask[:, :, 4:] = 1.0
    cond = image_tasks.inpaint_conditions(jnp.asarray(images), jnp.asarray(mask), lambda x: x * 2.0, (8, 8))
    np.testing.assert_array_equal(cond["concat"][..., :1], mask)
    np.testing.assert_allclose(cond["concat"][..., 1:], 2.0 * images * (1.0 - mask))


# --- configs ----------------------------------------------------------------------------------------


def _upscale_config():
    config = load_config("upscale_digits")
    config.train.update(preview_every=0)
    return config


@pytest.mark.parametrize("change, message", [
    (lambda c: c.image_task.update(kind=""), r"model.concat_channels=3, noise_level_conditioning=True: these take "
                                             r"image conditions; set image_task.kind"),
    (lambda c: c.image_task.update(kind="colorize"), r"image_task.kind='colorize': allowed values are"),
    (lambda c: c.model.update(concat_channels=5), r"image_task.kind='upscale' needs model.concat_channels=3"),
    (lambda c: c.model.update(noise_level_conditioning=False), "needs model.noise_level_conditioning=True"),
    (lambda c: c.image_task.update(low_res_size=7), "image_task.low_res_size=7 does not divide data.image_size=32"),
    (lambda c: c.image_task.update(max_noise_level=1000), r"image_task.max_noise_level=1000 must lie in \[0, 1000\)"),
    (lambda c: (c.image_task.update(kind="inpaint"), c.model.update(concat_channels=4, noise_level_conditioning=False)),
     "image_task.kind='inpaint' needs random masks: set data.inpaint_masks"),
    (lambda c: (c.image_task.update(kind="inpaint"), c.model.update(noise_level_conditioning=False)),
     r"image_task.kind='inpaint' needs model.concat_channels=4 \(hole \+ latent channels\)"),
])
def test_image_task_config_errors_name_the_field(change, message):
    config = _upscale_config()
    change(config)
    with pytest.raises(ValueError, match=message):
        tasks.make_task(config)


def test_an_inpainting_loss_builds_its_conditions_from_the_batch():
    config = load_config("inpaint_digits")
    config.model.update(input_size=16, patch_size=4, hidden_size=32, depth=1, in_channels=3, concat_channels=4,
                        num_classes=0)
    config.sample.update(guidance_scale=1.0)
    task = tasks.make_task(config)  # pixel space: no vae.path
    batch = next(_mask_batches())
    params = random_params(task.model, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)),
                           generation.example_conditions(task.model))
    loss = float(jax.jit(task.loss_fn)(params, task.frozen, batch, jax.random.key(0), 0)[0])
    assert np.isfinite(loss)
    del batch["mask"]
    with pytest.raises(KeyError, match="mask"):
        task.loss_fn(params, task.frozen, batch, jax.random.key(0), 0)


@pytest.mark.parametrize("name", ["upscale_digits", "inpaint_digits"])
def test_previews_of_an_image_task_condition_on_the_first_data_images(name):
    config = load_config(name)
    config.model.update(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=1)
    if name == "inpaint_digits":  # pixel space (no vae.path): 3 image channels + the hole
        config.model.update(concat_channels=4)
    config.data.update(image_size=16)
    config.image_task.update(low_res_size=4)
    config.sample.update(num_steps=2, grid_rows=2, grid_cols=2)
    config.train.update(preview_every=1)
    task = tasks.make_task(config)
    params = random_params(task.model, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)),
                           generation.example_conditions(task.model))
    grid = task.preview(params, task.frozen, jax.random.key(0))
    assert grid.shape == (32, 32, 3) and grid.dtype == np.uint8
    if name == "inpaint_digits":  # the right half is filled, the left half is the data's
        first = generation.to_uint8(tasks.preview_images(config, 1))[0]
        np.testing.assert_array_equal(grid[:16, :8], first[:, :8])


# --- sampling -----------------------------------------------------------------------------------------


def _bundle(path, model, image_task=None):
    y = generation.example_conditions(model)
    params = random_params(model, jnp.zeros((1, model.input_size, model.input_size, model.in_channels)),
                           jnp.zeros((1,)), y)
    metadata = {"task": "diffusion", **({"image_task": image_task.describe()} if image_task else {})}
    serialization.save_model(path, model, params, metadata=metadata)
    return str(path)


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random-weight bundles (class DiT, upscaler) and input images."""
    root = tmp_path_factory.mktemp("image_tasks")
    rng = np.random.default_rng(0)
    upscaler = DiT(**{**PIXEL_DIT, "input_size": 16}, num_classes=0, concat_channels=3, noise_level_conditioning=True)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    return {
        "class_dit": _bundle(root / "class_dit", DiT(**PIXEL_DIT, num_classes=10)),
        "upscaler": _bundle(root / "upscaler", upscaler, ImageTask.from_config(section("image_task", kind="upscale", low_res_size=4))),
        "image": _png(root / "image.png", rng.integers(0, 256, (8, 8, 3), np.uint8)),
        "mask": _png(root / "mask.png", mask),
        "small_mask": _png(root / "small_mask.png", mask[:4, :4]),
        "low": _png(root / "low.png", rng.integers(0, 256, (4, 4, 3), np.uint8)),
    }


def _sample_config(model_path, out_dir, **sample):
    config = load_config("dit_digits")
    config.diffusion.update(prediction="epsilon", beta_schedule="linear")
    config.sample.update(model_path=model_path, out_dir=str(out_dir), sampler="ddim", num_steps=6, guidance_scale=1.0,
                         grid_rows=2, grid_cols=4, batch_size=8, jump_length=2, jump_n_sample=2, **sample)
    return config


def test_repaint_from_the_sample_config_keeps_the_known_pixels(files, tmp_path):
    config = _sample_config(files["class_dit"], tmp_path / "out", image=files["image"], mask=files["mask"])
    outputs = sampling.sample_from_config(config, str(tmp_path), devices=jax.devices()[:2])
    grid = np.asarray(Image.open(outputs["grid"]))
    samples = grid.reshape(2, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(8, 8, 8, 3)
    image = np.asarray(Image.open(files["image"]))
    np.testing.assert_array_equal(samples[:, :, :4], np.broadcast_to(image[:, :4], (8, 8, 4, 3)))  # pixel space: exact
    assert len({s[:, 4:].tobytes() for s in samples}) == 8  # the hole differs per sample
    protocol = sampling.json.loads(open(outputs["protocol"]).read())["image_task"]
    assert protocol["task"] == "inpaint" and protocol["jumps"] == [2, 2] and len(protocol["mask_sha256"]) == 64


def test_upscaling_from_the_sample_config_is_reproducible_per_sample(files, tmp_path):
    config = _sample_config(files["upscaler"], tmp_path / "a", image=files["low"], task="upscale")
    grid = np.asarray(Image.open(sampling.sample_from_config(config, str(tmp_path), devices=jax.devices()[:2])["grid"]))
    assert grid.shape == (2 * 16, 4 * 16, 3)
    config.sample.update(out_dir=str(tmp_path / "b"), batch_size=4)
    again = np.asarray(Image.open(sampling.sample_from_config(config, str(tmp_path), devices=jax.devices()[:1])["grid"]))
    np.testing.assert_array_equal(grid, again)


@pytest.mark.parametrize("bundle, sample, message", [
    ("class_dit", dict(image="image", task="upscale"), r"--task=upscale \(sample.task\): sample.model_path=.* was not "
                                                      r"trained to upscale \(its image_task: none"),
    ("class_dit", dict(image="image"), r"--image \(sample.image\): .* was not trained for an image task; give --mask"),
    ("class_dit", dict(image="image", mask="small_mask"), r"sample.mask \(--mask\)=.*small_mask.png is 4x4, but the "
                                                         r"image sample.image=.*image.png is 8x8"),
    ("class_dit", dict(image="low", mask="small_mask"), r"sample.image \(--image\)=.*low.png is 4x4; the checkpoint "
                                                       r"makes 8x8 images"),
    ("upscaler", dict(), r"was trained to upscale: give the image \(--image, sample.image\)"),
    ("upscaler", dict(image="image"), r"sample.image \(--image\)=.*image.png is 8x8; the checkpoint upscales 4x4"),
    ("upscaler", dict(image="low", mask="mask", task="inpaint"), r"trained to upscale, not to inpaint"),
    ("upscaler", dict(image="low", mask="mask"), r"--mask \(sample.mask\): a mask is for inpainting"),
])
def test_image_task_sampling_errors_name_the_field(files, tmp_path, bundle, sample, message):
    config = _sample_config(files[bundle], tmp_path / "out", **{k: files.get(v, v) for k, v in sample.items()})
    with pytest.raises(ValueError, match=message):
        sampling.sample_from_config(config, str(tmp_path), devices=jax.devices()[:1])


def test_generator_refuses_a_mask_of_another_size():
    model = DiT(**PIXEL_DIT, num_classes=0)
    generator = generation.Generator(model, schedules.discrete_schedule("linear", 1000), samplers.SamplerConfig("ddim", 2))
    with pytest.raises(ValueError, match=r"the mask is \(1, 4, 4, 1\), the image \(1, 8, 8, 3\): they must be the same"):
        generator(None, None, jax.random.key(0), jnp.arange(1), jnp.zeros(1, jnp.int32),
                  image=jnp.zeros((1, 8, 8, 3)), mask=jnp.zeros((1, 4, 4, 1)))


@pytest.mark.slow
def test_latent_inpainting_pastes_the_known_pixels_unless_told_not_to():
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    vae_params = random_params(vae, jnp.zeros((1, 8, 8, 3)))
    model = DiT(**{**PIXEL_DIT, "input_size": 4, "in_channels": 4}, num_classes=0, concat_channels=5)
    params = random_params(model, jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)), generation.example_conditions(model))
    image = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    mask = jnp.zeros((2, 8, 8, 1)).at[:, :, 4:].set(1.0)
    generator = generation.Generator(model, schedules.discrete_schedule("linear", 1000), samplers.SamplerConfig("ddim", 3),
                                     generation.LatentDecoder(vae), image_task=ImageTask.from_config(section("image_task", kind="inpaint")), jumps=(1, 1))
    pasted = generator(params, vae_params, jax.random.key(0), jnp.arange(2), jnp.zeros(2, jnp.int32), image=image, mask=mask)
    decoded = dataclasses.replace(generator, paste_known=False)(params, vae_params, jax.random.key(0), jnp.arange(2),
                                                                jnp.zeros(2, jnp.int32), image=image, mask=mask)
    np.testing.assert_array_equal(pasted[:, :, :4], image[:, :, :4])
    np.testing.assert_array_equal(pasted[:, :, 4:], decoded[:, :, 4:])
    assert float(jnp.abs(decoded[:, :, :4] - image[:, :, :4]).max()) > 0.01  # a random VAE does not reconstruct


def test_sample_command_inpaints_with_image_and_mask_flags_and_names_bad_input(files, tmp_path):
    base = [sys.executable, "-m", "ldm_jax.cli", "sample", "--config=configs/dit_digits.py", f"--workdir={tmp_path}",
            f"--config.sample.model_path={files['class_dit']}", "--config.diffusion.prediction=epsilon",
            "--config.sample.num_steps=3", "--config.sample.grid_rows=1", "--config.sample.grid_cols=2",
            "--config.sample.batch_size=2", "--config.sample.guidance_scale=1", "--config.sample.jump_n_sample=1",
            "--config.mesh.data=1"]
    run = subprocess.run(base + [f"--image={files['image']}", f"--mask={files['mask']}"], cwd=ROOT,
                         env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    grid = np.asarray(Image.open(tmp_path / "samples" / "grid.png"))
    np.testing.assert_array_equal(grid[:, :4], np.asarray(Image.open(files["image"]))[:, :4])
    run = subprocess.run(base + [f"--image={files['image']}", f"--mask={files['small_mask']}",
                                 f"--config.sample.out_dir={tmp_path / 'bad'}"],
                         cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1].startswith("ldm-jax sample: error: ValueError: sample.mask (--mask)=")
    assert "is 4x4, but the image" in run.stderr
