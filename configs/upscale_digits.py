"""4x super-resolution of the bundled digits in pixel space: 8x8 -> 32x32 (SD x4-upscaler style).

    ldm-jax train --config=configs/upscale_digits.py --workdir=/tmp/upscale_digits
    ldm-jax sample --config=configs/upscale_digits.py --workdir=/tmp/upscale_digits --image=low.png

The DiT takes the 8x8 image (area-downsampled from the 32x32 training images, noise-augmented to a
random level in [0, 100] of a 1000-step linear schedule, the level embedded like the timestep) as
3 extra input channels, upsampled bilinearly to its 32x32 grid. Sampling noises the given 8x8
image to image_task.noise_level (or sample.noise_level) and upscales it; `--image` must be 8x8.
"""
from ldm_jax.config import default_config


def get_config():
    config = default_config()
    config.data.update(source="digits", image_size=32, batch_size=32, random_flip=False, num_threads=2)
    config.model = dict(
        input_size=32, patch_size=4, in_channels=3, hidden_size=96, depth=3, num_heads=4,
        num_classes=0, class_dropout_prob=0.0, learn_sigma=False, concat_channels=3,
        noise_level_conditioning=True,
    )
    # Clean low-res inputs (area-downsampled digits): light augmentation in training, none when sampling.
    config.image_task.update(kind="upscale", low_res_size=8, max_noise_level=100, noise_level=0)
    config.diffusion.update(prediction="v", beta_schedule="cosine")
    config.optimizer.update(learning_rate=2e-3, warmup_steps=50, grad_clip_norm=1.0)
    config.ema.update(decay=0.995, warmup=True)
    config.train.update(num_steps=600, log_every=100, checkpoint_every=600, preview_every=600)
    config.sample.update(sampler="ddim", num_steps=20, grid_rows=4, grid_cols=8)
    return config
