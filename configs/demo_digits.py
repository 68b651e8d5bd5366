"""The built-in default: latent diffusion end to end on the bundled digits, in minutes on a CPU.

    ldm-jax demo --config=configs/demo_digits.py --workdir=workdir/demo

Stage 1 trains a small KL-VAE (f2, 4 latent channels) on 16x16 digits; stage 2 trains a
class-conditional DiT on its latents (8x8x4, encoded on the fly); stage 3 samples a grid (one row
per digit) and 1,000 class-balanced samples, which a digits classifier (scikit-learn, trained on the
training split) labels. Each stage is an ordinary config: override it as
`--config.dit_stage.train.num_steps=3000`.
"""
import ml_collections

from ldm_jax.config import default_config


def vae_stage():
    config = default_config()
    config.task = "autoencoder"
    config.data.update(source="digits", image_size=16, batch_size=32, random_flip=False, num_threads=2)
    config.model = dict(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        in_channels=3, out_channels=3,
    )
    config.vae_loss.update(kl_weight=1e-6, disc_factor=0.0,  # no PatchGAN at this size: L1 + KL
                           discriminator=dict(ndf=16, n_layers=1, norm="group", norm_groups=8))
    config.optimizer.update(learning_rate=2e-3, b1=0.5, b2=0.9, warmup_steps=50)
    config.ema.update(decay=0.99, warmup=True)
    config.train.update(num_steps=400, log_every=100, checkpoint_every=400, preview_every=0)
    return config


def dit_stage():
    config = default_config()
    config.data.update(source="digits", image_size=16, batch_size=64, random_flip=False, num_threads=2)
    config.model = dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=4, num_heads=4,
        num_classes=10, class_dropout_prob=0.1, learn_sigma=False,
    )
    config.vae.path = ""  # the demo sets it to stage 1's export
    config.diffusion.update(prediction="v", beta_schedule="cosine")
    config.optimizer.update(learning_rate=1e-3, warmup_steps=100, grad_clip_norm=1.0)
    config.ema.update(decay=0.999, warmup=True)
    config.train.update(num_steps=1000, log_every=100, checkpoint_every=1000, preview_every=0)
    # Guidance 1.5: 95.4 % recognised at 1.9x the real digits' Frechet distance; 3.0 reaches 99.9 % with
    # far less varied samples (5.9x). benchmarks/guidance_sweep.py, table in benchmarks/RESULTS.md.
    config.sample.update(sampler="ddim", num_steps=25, guidance_scale=1.5, grid_rows=10, grid_cols=10,
                         num_samples=1000, batch_size=200, labels="balanced")
    return config


def get_config():
    config = ml_collections.ConfigDict()
    config.vae_stage = vae_stage()
    config.dit_stage = dit_stage()
    return config
