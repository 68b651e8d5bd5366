"""Super-resolution's acceptance, trained briefly on the bundled digits on CPU: configs/upscale_digits.py
(8x8 -> 32x32) beats bicubic upsampling in PSNR against the held-out 32x32 digits; `ldm-jax sample
--task upscale --image low.png` on it. (tests/test_image_tasks.py: the pieces and the errors.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bundles import task_generator, train_and_export
from ldm_jax import demo
from ldm_jax.conditioning import image_tasks
from ldm_jax.data import transforms
from ldm_jax.inference import generation, sampling
from subprocesses import load_config

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this module out

UPSCALE_STEPS = 800  # 28.9 dB after 1,000 steps (bicubic: 26.8 dB)
NUM_HELD_OUT = 128


def _psnr(images, reference):
    """Mean PSNR (dB) of uint8 images against uint8 references, per image."""
    mse = np.mean((images.astype(np.float64) - reference) ** 2, axis=(1, 2, 3))
    return float(np.mean(10.0 * np.log10(255.0 ** 2 / mse)))


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    config = load_config("upscale_digits")
    config.train.update(num_steps=UPSCALE_STEPS, preview_every=0)
    path = tmp_path_factory.mktemp("upscale") / "model"
    task, state = train_and_export(config, path)
    return config, task, state, str(path)


def test_upscaling_8_to_32_beats_bicubic_on_held_out_digits(upscaler):
    config, task, state, _ = upscaler
    images, _ = demo.preprocessed_digits(config.data, "test")
    images = images[:NUM_HELD_OUT]
    low = np.asarray(image_tasks.downsample(jnp.asarray(transforms.to_unit_range(images)), 8))
    upscaled = generation.to_uint8(task_generator(config, task)(
        state.ema_params, None, jax.random.key(0), jnp.arange(len(low)), jnp.zeros(len(low), jnp.int32),
        image=jnp.asarray(low)))
    bicubic = np.stack([np.asarray(Image.fromarray(x).resize((32, 32), Image.BICUBIC))
                        for x in generation.to_uint8(low)])
    model_psnr, bicubic_psnr = _psnr(upscaled, images), _psnr(bicubic, images)
    print(f"{UPSCALE_STEPS} steps: 8x8 -> 32x32 PSNR {model_psnr:.2f} dB, bicubic {bicubic_psnr:.2f} dB "
          f"({NUM_HELD_OUT} held-out digits)")
    assert model_psnr > bicubic_psnr


def test_sample_upscales_the_given_image(upscaler, tmp_path):
    config, _, _, path = upscaler
    image = demo.preprocessed_digits(config.data, "test")[0][0]
    low = generation.to_uint8(image_tasks.downsample(jnp.asarray(transforms.to_unit_range(image[None])), 8))[0]
    Image.fromarray(low).save(tmp_path / "low.png")
    config.sample.update(model_path=path, image=str(tmp_path / "low.png"), task="upscale", grid_rows=1, grid_cols=4,
                         batch_size=4, out_dir=str(tmp_path / "out"))
    grid = np.asarray(Image.open(sampling.sample_from_config(config, str(tmp_path), devices=jax.devices()[:1])["grid"]))
    samples = grid.reshape(32, 4, 32, 3).transpose(1, 0, 2, 3)
    bicubic = np.asarray(Image.fromarray(low).resize((32, 32), Image.BICUBIC))
    assert _psnr(samples, image[None]) > _psnr(bicubic[None], image[None])
