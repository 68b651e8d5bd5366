"""A small KL-VAE (f4, 4 latent channels) on the bundled digits at 32x32: the LDM recipe without its PatchGAN.

    ldm-jax train --config=configs/vae_digits.py --workdir=/tmp/vae_digits
"""
from ldm_jax.config import default_config


def get_config():
    config = default_config()
    config.task = "autoencoder"
    config.data.update(source="digits", image_size=32, batch_size=32, random_flip=False, num_threads=2)
    config.model = dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        in_channels=3, out_channels=3,
    )
    # L1 + KL, no PatchGAN (disc_factor=0, like the demo's VAE stage). Measured on the 300 held-out
    # digits (issue #20), exported EMA bundle after 1,000 steps: PSNR 41.4 dB, L1 0.0117 (in [-1, 1])
    # without the GAN; 41.4 dB / 0.0116 with the former PatchGAN phase (ndf=32, n_layers=2, from step
    # 600, disc_weight 0.5), i.e. no gain: the reconstructions are already near exact, the generator
    # matches any feature D finds, and D drifts to an input-blind output within ~100 steps (the same
    # logits on real, reconstructed, noise and all-zero images), so the hinge loss sits at 1.0 and the
    # adaptive weight at its clamp (d_weight 5,000). The same D trained against a frozen VAE does learn
    # (hinge 1.04 -> 0.33 in 300 steps), so the loss is not at fault. The discriminator below is the
    # smallest one (it still runs, with zero weight, in every step); to try the GAN phase again set
    # disc_factor=1.0, disc_start=600, disc_weight=0.5 and ndf=32, n_layers=2, norm_groups=16.
    config.vae_loss.update(kl_weight=1e-6, disc_factor=0.0,
                           discriminator=dict(ndf=16, n_layers=1, norm="group", norm_groups=8))
    config.optimizer.update(learning_rate=1e-3, b1=0.5, b2=0.9, warmup_steps=50)
    config.ema.update(decay=0.99, warmup=True)
    config.train.update(num_steps=1000, log_every=100, checkpoint_every=500, preview_every=0)
    return config
