"""A tiny class-conditional DiT on the bundled digits, in pixel space (16x16): minutes on a CPU.

    ldm-jax train --config=configs/dit_digits.py --workdir=/tmp/dit_digits
"""
from ldm_jax.config import default_config


def get_config():
    config = default_config()
    config.data.update(source="digits", image_size=16, batch_size=64, random_flip=False, num_threads=2)
    config.model = dict(
        input_size=16, patch_size=2, in_channels=3, hidden_size=96, depth=4, num_heads=4,
        num_classes=10, class_dropout_prob=0.1, learn_sigma=False,
    )
    # v-prediction: well conditioned at every noise level of the cosine schedule (an epsilon model must
    # divide by alpha_t ~ 0 near t = T, which ruins few-step pixel-space samples).
    config.diffusion.update(prediction="v", beta_schedule="cosine")
    config.optimizer.update(learning_rate=1e-3, warmup_steps=100, grad_clip_norm=1.0)
    config.ema.update(decay=0.999, warmup=True)
    config.train.update(num_steps=1500, log_every=100, checkpoint_every=500, preview_every=1500)
    # clip_x0: pixels live in [-1, 1].
    config.sample.update(sampler="ddim", num_steps=50, guidance_scale=2.0, grid_rows=10, grid_cols=10, clip_x0=1.0)
    return config
