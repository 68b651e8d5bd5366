"""DiT's ImageNet 256x256 result from the official weights: DiT-XL/2, cfg 1.5, 50K samples, ADM's evaluator.

The paper's protocol (Peebles & Xie 2023, its ImageNet 256x256 table; sample_ddp.py): 50,000
samples of random classes, 250 DDPM steps (ADM's respaced "250": linspace spacing over the
1000-step linear schedule, learned variance), classifier-free guidance 1.5 on the first 3 latent
channels, decoded by sd-vae-ft-ema (latents / 0.18215), evaluated against ADM's
VIRTUAL_imagenet256_labeled.npz.
Expected (DiT-XL/2, cfg 1.50): FID 2.27, sFID 4.60, IS 278.24, precision 0.83, recall 0.57.
Our Inception follows pytorch-fid's preprocessing, so FID / sFID may differ from the paper's
TF-graph numbers by a small offset (see ldm_jax/evaluation/fid.py).

Files you supply (nothing is downloaded), by default under weights/: DiT-XL-2-256x256.pt
(github.com/facebookresearch/DiT), the diffusers folder of stabilityai/sd-vae-ft-ema,
VIRTUAL_imagenet256_labeled.npz (ADM's evaluations README) and pytorch-fid's
pt_inception-2015-12-05-6726825d.pth. With WORK a work directory:

    ldm-jax convert --from=dit_official --src=weights/DiT-XL-2-256x256.pt --model=DiT-XL/2 \
        --image_size=256 --out=$WORK/model
    ldm-jax convert --from=vae_diffusers --src=sd-vae-ft-ema --out=weights/sd-vae-ft-ema
    ldm-jax sample --config=configs/dit_xl2_imagenet256_eval.py --workdir=$WORK
    ldm-jax evaluate --config=configs/dit_xl2_imagenet256_eval.py --workdir=$WORK

Files elsewhere: --config.vae.path=..., --config.sample.model_path=... (default $WORK/model),
--config.evaluate.reference=..., --config.evaluate.inception_path=.... `sample` writes
$WORK/samples/{samples.npz, protocol.json} in resumable chunks (re-run the same command after an
interruption); `evaluate` writes $WORK/evaluation.json (metrics + protocol: file hashes, sampler,
guidance, VAE). Multi-host: run the same commands on every host (config.distributed).
"""
from ldm_jax.config import default_config


def get_config():
    config = default_config()
    config.model.update(preset="DiT-XL/2", input_size=256 // 8, in_channels=4, learn_sigma=True, num_classes=1000)
    config.diffusion.update(prediction="epsilon", beta_schedule="linear", num_timesteps=1000)
    # Latents are sd-vae-ft-ema's scaled by its own scaling_factor (0.18215, carried by its bundle).
    config.data.update(latent_norm="vae")
    config.vae.path = "weights/sd-vae-ft-ema"  # the converted sd-vae-ft-ema bundle
    config.sample.update(
        sampler="ddpm",
        num_steps=250,
        spacing="linspace",  # = ADM's respace(space_timesteps(1000, "250")) (tests/test_evaluate.py)
        guidance_scale=1.5,
        guided_channels=3,  # DiT guides the first 3 of the 4 latent channels
        num_samples=50_000,
        labels="random",
        batch_size=256,  # global; a multiple of the devices (the last batch is padded and trimmed)
        seed=0,
    )
    config.evaluate.update(
        reference="weights/VIRTUAL_imagenet256_labeled.npz",  # ADM's reference batch (stats + 10K images)
        inception_path="weights/pt_inception-2015-12-05-6726825d.pth",
        batch_size=256, num_splits=10, k=3,
    )
    return config
