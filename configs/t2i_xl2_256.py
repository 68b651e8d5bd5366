"""Text-to-image at 256x256: a PixArt-alpha-style DiT-XL/2 on captioned images. Sized for a v5p-64
slice (32 chips, 8 hosts): data parallel, 16 images per chip (DiT-XL/2 with cross-attention, ~0.8B
parameters in fp32 with AdamW and EMA, fits a v5p chip's 95 GB without sharding the weights; set
mesh.fsdp to shard them on smaller chips, see docs/capacity.md).

The model: DiT-XL/2 blocks with cross-attention to the caption tokens of Stable Diffusion 1.x's CLIP
text encoder (width 768) and PixArt-alpha's adaLN-single (one shared timestep modulation + a table
per block); no class labels. Captions come from an image folder with `.txt` files beside the images;
latents (sd-vae-ft-ema) and the CLIP embeddings are cached together, so training never runs either:

    ldm-jax convert --from=vae_diffusers --src=sd-vae-ft-ema --out=weights/sd-vae-ft-ema
    ldm-jax encode --config=configs/t2i_xl2_256.py --config.data.source=image_folder \
        --config.data.path=IMAGES --out=LATENTS
    python -m launch.tpu_vm run --name=t2i --zone=ZONE --accelerator=v5p-64 --spot \
        --config=configs/t2i_xl2_256.py --workdir=/mnt/runs/t2i -- --config.data.path=LATENTS

Recipe after PixArt-alpha's 256px stage: AdamW lr 2e-5, weight decay 0.03, gradient clipping,
caption dropout 0.1 (the empty caption's embedding, also guidance's null condition), learned sigma,
linear schedule with 1000 steps, EMA 0.9999; the step count is a budget, not a paper figure.
"""
from ldm_jax.config import default_config


def get_config():
    config = default_config()
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    config.data.update(
        source="latents", path="", image_size=256, batch_size=512, random_flip=False, latent_sample=True,
        latent_norm="vae", num_threads=8, prefetch_batches=4,  # sd-vae-ft-ema's scaling_factor, from the cache
    )
    config.model = dict(
        preset="DiT-XL/2", input_size=32, in_channels=4, num_classes=0, class_dropout_prob=0.1,
        learn_sigma=True, context_dim=768, adaln="single", dtype="bfloat16", remat=False,
    )
    # Frozen models: the VAE decodes previews; the text encoder embeds the preview prompts and the
    # empty caption (training reads the cached caption embeddings).
    config.vae.path = "weights/sd-vae-ft-ema"
    config.text.update(encoder_path="weights/sd15/text_encoder", tokenizer_path="weights/sd15/tokenizer",
                       max_length=77)
    config.diffusion.update(prediction="epsilon", beta_schedule="linear", num_timesteps=1000)
    config.optimizer.update(name="adamw", learning_rate=2e-5, weight_decay=0.03, schedule="constant",
                            warmup_steps=1000, grad_clip_norm=0.01)
    config.ema.update(decay=0.9999, warmup=False)
    config.train.update(
        num_steps=400_000, log_every=100, checkpoint_every=10_000, keep_checkpoints=2, keep_every=100_000,
        preview_every=20_000, peak_tflops_per_device=459.0,  # TPU v5p bf16 peak, for the logged MFU
    )
    config.sample.update(sampler="dpm_solver++", num_steps=20, guidance_scale=4.5, grid_rows=4, grid_cols=4,
                         prompts=("a photograph of a red fox in the snow", "a bowl of ramen, studio lighting",
                                  "an oil painting of a lighthouse at dusk", "a city street at night, rain"))
    return config
