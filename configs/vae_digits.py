"""A small KL-VAE (f4, 4 latent channels) on the bundled digits at 32x32, the LDM recipe.

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
    config.vae_loss.update(kl_weight=1e-6, disc_start=600, disc_weight=0.5,
                           discriminator=dict(ndf=32, n_layers=2, norm="group", norm_groups=16))
    config.optimizer.update(learning_rate=1e-3, b1=0.5, b2=0.9, warmup_steps=50)
    config.ema.update(decay=0.99, warmup=True)
    config.train.update(num_steps=1000, log_every=100, checkpoint_every=500, preview_every=0)
    return config
