"""A class-conditional inpainting DiT on the bundled digits' latents (Stable Diffusion inpainting style).

    ldm-jax demo --config=configs/demo_digits.py --workdir=workdir/demo    # trains the VAE it uses
    ldm-jax train --config=configs/inpaint_digits.py --workdir=workdir/inpaint \
        --config.vae.path=workdir/demo/vae/model
    ldm-jax sample --config=configs/inpaint_digits.py --workdir=workdir/inpaint \
        --config.vae.path=workdir/demo/vae/model --image=digit.png --mask=mask.png

The DiT (the demo's, on 8x8x4 latents of 16x16 digits) takes 5 extra input channels: the hole on the
latent grid and the latents of the masked image; the data pipeline draws a random box or brush
stroke mask per image. Sampling keeps the known latents exactly (the known-region replacement of
RePaint without resampling), so the known pixels come back within the VAE's reconstruction error.
"""
from ldm_jax.config import default_config


def get_config():
    config = default_config()
    config.data.update(source="digits", image_size=16, batch_size=32, random_flip=False, num_threads=2,
                       inpaint_masks=("box", "stroke"))
    config.model = dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=4, num_heads=4,
        num_classes=10, class_dropout_prob=0.1, learn_sigma=False, concat_channels=5,
    )
    config.image_task.update(kind="inpaint")
    config.vae.path = ""  # a KL-VAE bundle (e.g. the demo's workdir/demo/vae/model)
    config.diffusion.update(prediction="v", beta_schedule="cosine")
    config.optimizer.update(learning_rate=2e-3, warmup_steps=100, grad_clip_norm=1.0)
    config.ema.update(decay=0.999, warmup=True)
    config.train.update(num_steps=1500, log_every=100, checkpoint_every=1500, preview_every=1500)
    config.sample.update(sampler="ddim", num_steps=25, guidance_scale=3.0, grid_rows=10, grid_cols=10)
    return config
