"""Every field a training run reads, with its default: experiment files in configs/ override these.

    config = default_config()            # ml_collections.ConfigDict
    config.model.preset = "DiT-XL/2"     # or set fields in configs/<experiment>.py

Fields are grouped by the part of the system that reads them; see each module for their meaning.
"""
from __future__ import annotations

import ml_collections

from ldm_jax.data import pipeline


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "diffusion"  # training/tasks.py: "diffusion" (DiT) or "autoencoder" (KL-VAE)
    config.seed = 0

    # parallel/mesh.py: axis sizes; one may be -1 (all remaining devices).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.distributed = ml_collections.ConfigDict(
        dict(coordinator_address="", num_processes=0, process_id=-1, auto=False)
    )
    config.data = pipeline.default_config()

    # models/dit.py fields (+ preset) for task="diffusion".
    config.model = ml_collections.ConfigDict(dict(preset="DiT-S/2", input_size=32, num_classes=1000))
    # A frozen VAE model bundle: images are encoded on the fly and previews decoded ("" = none:
    # latents come from a latent cache, or diffusion runs in pixel space).
    config.vae = ml_collections.ConfigDict(dict(path=""))
    # conditioning/text_encoding.py: captions/prompts -> a frozen CLIP text encoder -> the DiT's context/pooled
    # (model.context_dim / pooled_dim = its width); caption dropout: model.class_dropout_prob.
    config.text = ml_collections.ConfigDict(
        dict(
            encoder_path="",  # CLIPTextEncoder bundle or transformers CLIPTextModel folder ("" = none)
            tokenizer_path="",  # CLIP tokenizer folder (vocab.json + merges.txt)
            max_length=77,  # tokens per caption (bos + text + eos; longer ones truncated, with a warning)
            skip_last_layers=0,  # diffusers' clip_skip
        )
    )
    # conditioning/image_tasks.py: a DiT that inpaints (model.concat_channels = 1 + latent channels; masks
    # from data.inpaint_masks) or upscales (concat_channels = 3, noise_level_conditioning=True).
    config.image_task = ml_collections.ConfigDict(
        dict(
            kind="",  # "" (none) | "inpaint" | "upscale"
            low_res_size=8,  # upscale: the low-res input's side in pixels (area-downsampled images)
            max_noise_level=350,  # upscale: training augments the low-res input at levels U{0..max} of 1000
            noise_level=20,  # upscale: the level sampling uses (sample.noise_level overrides)
        )
    )
    # diffusion/objectives.py: DiffusionObjective.
    config.diffusion = ml_collections.ConfigDict(
        dict(
            prediction="epsilon",  # "epsilon" | "v" | "x0" | "flow"
            beta_schedule="linear",
            num_timesteps=1000,
            zero_terminal_snr=False,
            min_snr_gamma=ml_collections.config_dict.placeholder(float),
            vb_weight=1.0,
            flow_time_scale=1000.0,
            time_distribution="uniform",
            time_loc=0.0,
            time_std=1.0,
            time_shift=1.0,
        )
    )
    # task="autoencoder": training/vae_losses.py VAELoss fields + the PatchGAN discriminator
    # (models/discriminator.py) + LPIPS weight files (off, with a warning, when unset).
    config.vae_loss = ml_collections.ConfigDict(
        dict(
            kl_weight=1e-6, perceptual_weight=1.0, disc_weight=0.5, disc_factor=1.0, disc_start=50001,
            disc_loss="hinge", logvar_init=0.0, lpips_vgg_path="", lpips_lins_path="",
            discriminator=dict(ndf=64, n_layers=3, norm="group", norm_groups=32),
        )
    )
    # training/optimizers.py. DiT: AdamW, lr 1e-4, no weight decay, constant.
    config.optimizer = ml_collections.ConfigDict(
        dict(name="adamw", learning_rate=1e-4, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9,
             schedule="constant", warmup_steps=0, total_steps=0, grad_clip_norm=0.0)
    )
    config.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=False))
    config.train = ml_collections.ConfigDict(
        dict(
            num_steps=400_000,
            accumulation_steps=1,
            log_every=100,
            checkpoint_every=10_000,
            keep_checkpoints=3,
            keep_every=0,  # also keep every n-th step's checkpoint (0 = no)
            # A workdir holds one run: a restart whose config changes the state or the maths, or whose
            # checkpoints are all unreadable, is refused; True moves the old checkpoints aside instead.
            force_new=False,
            # training/nonfinite.py: a step whose loss, gradients or update are NaN/inf is not applied, then
            # "stop" (the run, naming the step) | "skip" (go on) | "rollback" (to the newest checkpoint, the
            # data going on past the bad batches).
            nonfinite="stop",
            nonfinite_max=5,  # "skip": bad steps in a row, "rollback": rollbacks in a row, before it stops
            preview_every=10_000,  # sample a grid into the logs (0 = never)
            profile_steps=0,  # clu profile of n steps (0 = off)
            peak_tflops_per_device=0.0,  # for the MFU estimate (0 = not reported)
        )
    )
    # Sampling (previews, `ldm-jax sample`): diffusion/samplers.py SamplerConfig fields + guidance;
    # the prediction type and the variance (learned with model.learn_sigma) follow the model.
    config.sample = ml_collections.ConfigDict(
        dict(
            sampler="ddim", num_steps=50, spacing="leading", eta=0.0,
            clip_x0=ml_collections.config_dict.placeholder(float),
            guidance_scale=1.0,  # classifier-free guidance scale (1 = off)
            guidance_interval=(0.0, 1.0),  # guide where t/T lies in [lo, hi]
            guided_channels=ml_collections.config_dict.placeholder(int),  # guide the first k (None = all)
            grid_rows=8, grid_cols=8,  # the PNG grid: row r shows class r / prompt r (mod their number)
            prompts=(),  # text-conditioned models: sample i uses prompt i mod len (CLI: --prompt, repeated)
            prompts_file="",  # or one prompt per line of this file
            # `ldm-jax sample` (ldm_jax/inference/sampling.py):
            model_path="",  # DiT model bundle ("" = <workdir>/model, what `train` exports)
            num_samples=0,  # samples in the .npz (0 = the PNG grid only)
            batch_size=64,  # global batch = one resumable chunk of the .npz
            labels="random",  # class of sample i: "random" (from its seed) | "balanced" (i mod classes)
            seed=0,  # sample i draws all its noise from fold_in(PRNGKey(seed), i)
            out_dir="",  # "" = <workdir>/samples
            # Image tasks (CLI: --task, --image, --mask): every sample inpaints / upscales sample.image.
            task="",  # "" = what the model was trained for (with a mask: inpaint) | "inpaint" | "upscale"
            image="",  # the image to inpaint (the output's size) or to upscale (image_task.low_res_size)
            mask="",  # inpaint: white (> 127) = fill, black = keep; the image's size
            jump_length=10,  # inpaint: RePaint's resampling jumps (samplers.Inpainting)
            jump_n_sample=ml_collections.config_dict.placeholder(int),  # None: 1 for trained inpainting, else 10
            paste_known=True,  # inpaint: the output's known pixels are the input's (False: as decoded)
            noise_level=ml_collections.config_dict.placeholder(int),  # upscale: None = image_task.noise_level
        )
    )
    # `ldm-jax evaluate` (ldm_jax/evaluation/): FID, sFID, IS, precision/recall of samples.
    config.evaluate = ml_collections.ConfigDict(
        dict(
            samples="",  # a samples .npz (arr_0) or image folder ("" = what `sample` wrote in workdir)
            reference="",  # an ADM reference batch .npz, an image folder, or "data" (config.data)
            inception_path="",  # pytorch-fid weights pt_inception-2015-12-05-6726825d.pth
            batch_size=64,
            num_splits=10,  # Inception Score splits
            k=3,  # precision/recall neighbours
        )
    )
    return config
