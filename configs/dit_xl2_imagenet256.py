"""DiT-XL/2 on ImageNet 256x256, the DiT paper's recipe (Peebles & Xie, 2023). Sized for a v4-32 slice
(16 chips, 4 hosts): data parallel, 16 images per chip; docs/capacity.md has the memory per chip and
the expected step time for this and other layouts.

Latents come from a latent cache of ImageNet made with the sd-vae-ft-ema VAE (256x256 ADM centre
crops, both flips cached; the loop samples z from the cached posterior and scales it by 0.18215):

    ldm-jax convert --from=vae_diffusers --src=sd-vae-ft-ema --out=weights/sd-vae-ft-ema
    ldm-jax encode --config=configs/dit_xl2_imagenet256.py --config.data.source=tfds \
        --config.data.name=imagenet2012 --config.data.data_dir=DATA --out=LATENTS
    python -m launch.tpu_vm run --name=dit-xl2 --zone=ZONE --accelerator=v4-32 --spot \
        --config=configs/dit_xl2_imagenet256.py --workdir=/mnt/runs/dit_xl2 -- --config.data.path=LATENTS

Recipe: AdamW, lr 1e-4 constant, no weight decay, global batch 256, EMA 0.9999, class dropout 0.1,
learned sigma (the hybrid loss), linear schedule with 1000 steps, random horizontal flips. The paper
trains its headline model (FID 2.27 with guidance 1.5) for 7M steps, its ablations for 400K.
Sampling follows its FID protocol: 250 DDPM steps, guidance 1.5 on the first three latent channels.
"""
from ldm_jax.config import default_config


def get_config():
    config = default_config()
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    config.data.update(
        source="latents", path="", image_size=256, batch_size=256, random_flip=True, latent_sample=True,
        latent_norm="vae", num_threads=8, prefetch_batches=4,  # sd-vae-ft-ema's scaling_factor, from the cache
    )
    config.model = dict(
        preset="DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, class_dropout_prob=0.1,
        learn_sigma=True, dtype="bfloat16", remat=False,  # remat: see docs/capacity.md
    )
    # The sd-vae-ft-ema bundle (`ldm-jax convert`): decodes the previews; training reads cached latents.
    config.vae.path = "weights/sd-vae-ft-ema"
    config.diffusion.update(prediction="epsilon", beta_schedule="linear", num_timesteps=1000)
    config.optimizer.update(name="adamw", learning_rate=1e-4, weight_decay=0.0, schedule="constant")
    config.ema.update(decay=0.9999, warmup=False)
    config.train.update(
        num_steps=7_000_000, log_every=100, checkpoint_every=10_000, keep_checkpoints=2, keep_every=100_000,
        preview_every=50_000, peak_tflops_per_device=275.0,  # TPU v4 bf16 peak, for the logged MFU
    )
    # The paper's FID protocol, as in configs/dit_xl2_imagenet256_eval.py (ADM's respaced 250 steps).
    config.sample.update(sampler="ddpm", num_steps=250, spacing="linspace", guidance_scale=1.5, guided_channels=3,
                         num_samples=50_000, batch_size=256, labels="random")
    return config
