"""The f8 KL-VAE of Stable Diffusion (4 latent channels) on ImageNet 256x256 with the LDM recipe. Sized
for a v4-8 slice (4 chips, one host): global batch 64, 16 images per chip, bf16 compute with
rematerialised ResNet blocks.

LDM's `autoencoder_kl_32x32x4` recipe: L1 + LPIPS reconstruction loss, KL weight 1e-6, PatchGAN
discriminator (hinge loss, adaptive weight 0.5) from step 50,001, Adam with betas (0.5, 0.9) and
lr = 4.5e-6 x global batch (LDM's scaling). LPIPS needs two weight files at the paths below (see
`ldm_jax.convert.lpips`); without them training runs without the perceptual term and says so.

    python -m launch.tpu_vm run --name=vae-f8 --zone=ZONE --accelerator=v4-8 \
        --config=configs/vae_imagenet256.py --workdir=/mnt/runs/vae_f8 -- --config.data.data_dir=DATA
"""
from ldm_jax.config import default_config
from ldm_jax.models.vae import SD_VAE_CONFIG


def get_config():
    config = default_config()
    config.task = "autoencoder"
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    config.data.update(source="tfds", name="imagenet2012", data_dir="", split="train", image_size=256,
                       batch_size=64, random_flip=True, num_threads=16, prefetch_batches=4)
    architecture = {k: v for k, v in SD_VAE_CONFIG.items() if k not in ("scaling_factor", "shift_factor")}
    config.model = dict(architecture, dtype="bfloat16", remat=True)
    config.vae_loss.update(
        kl_weight=1e-6, perceptual_weight=1.0, disc_weight=0.5, disc_factor=1.0, disc_start=50_001, disc_loss="hinge",
        lpips_vgg_path="weights/vgg16-397923af.pth", lpips_lins_path="weights/lpips_v0.1_vgg.pth",
        discriminator=dict(ndf=64, n_layers=3, norm="group", norm_groups=32),
    )
    config.optimizer.update(name="adam", learning_rate=4.5e-6 * 64, b1=0.5, b2=0.9, schedule="constant")
    config.ema.update(decay=0.9999, warmup=True)
    config.train.update(num_steps=500_000, log_every=100, checkpoint_every=10_000, keep_checkpoints=2,
                        keep_every=100_000, preview_every=10_000, peak_tflops_per_device=275.0)
    return config
