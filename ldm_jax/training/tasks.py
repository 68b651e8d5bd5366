"""What the loop trains, built from the config: model, loss, frozen inputs, previews, export.

A `Task` is all the loop needs to know about a model; the loop itself is model-agnostic.
  * "diffusion": a DiT on latents (cached, or images encoded on the fly by a frozen VAE bundle),
    or on pixels when no VAE is configured; conditioned on labels and/or text (captions embedded
    by a frozen CLIP text encoder inside the step, or read from a latent cache's text embeddings)
    and/or, with `image_task`, on images it inpaints or upscales (`image_tasks`).
  * "autoencoder": the KL-VAE with the LDM recipe (L1 + optional LPIPS + KL + PatchGAN hinge loss
    with the adaptive weight); params = {"autoencoder", "discriminator"}, one optimizer over both
    (the generator and discriminator losses touch disjoint parameters).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import latent_space
from ldm_jax.conditioning import image_tasks, text_encoding
from ldm_jax.conditioning.image_tasks import ImageTask
from ldm_jax.convert.lpips import load_lpips_or_none
from ldm_jax.data import pipeline, sources, transforms
from ldm_jax.diffusion import objectives
from ldm_jax.inference import bundles, generation
from ldm_jax.models import serialization
from ldm_jax.models.backbones import backbone_from_config, module_from_config
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.dit import DiT
from ldm_jax.models.vae import AutoencoderKL, scale_latents
from ldm_jax.training import steps, vae_losses

TASKS = ("diffusion", "autoencoder")


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """model: the trained module. init_params(key) -> boxed params. loss_fn: see `steps.train_step`.
    frozen: non-trained inputs of the loss (a pytree or None). preview(params, frozen, key) ->
    uint8 image grid [H, W, 3] written to the logs. export(path, params): saves a model bundle."""

    model: nn.Module
    init_params: Callable[[jax.Array], Any]
    loss_fn: steps.LossFn
    frozen: Any
    preview: Callable[[Any, Any, jax.Array], np.ndarray]
    export: Callable[[str, Any], None]


def _encode_images(vae, scale, shift, vae_params, images, key):
    """images [B, H, W, 3] in [-1, 1] -> normalised latent samples [B, h, w, C]."""
    posterior = vae.apply({"params": vae_params}, images, method=vae.encode)
    return scale_latents(posterior.sample(key), scale, shift)


def _check_text_width(model: DiT, width: int, origin: str) -> None:
    for field in ("context_dim", "pooled_dim"):
        value = getattr(model, field)
        if value is not None and value != width:
            raise ValueError(f"model.{field}={value}, but the text embeddings of {origin} are {width} wide")


def _cached_text(config: Any) -> dict[str, Any] | None:
    """The text settings of the latent cache the data config names (None: no cached text)."""
    if config.data.source != "latents":
        return None
    return sources.read_latent_meta(config.data.path).get("text")


def _text_setup(
    config: Any, model: DiT, frozen: dict[str, Any]
) -> tuple[text_encoding.TextEncoder | None, text_encoding.PromptConditions | None]:
    """For a text-conditioned DiT: puts the empty caption's embedding (and the text encoder's params,
    when captions arrive as token ids) into `frozen`. Returns (the encoder the loss runs on token
    ids, or None: cached embeddings; the preview prompts' conditions, or None: no previews)."""
    keys = text_encoding.text_keys(model)
    loaded = text_encoding.text_encoder_from_config(config.text)
    if not keys:
        if loaded is not None:
            logging.warning("text.encoder_path is set, but the model takes no text (model.context_dim and "
                            "pooled_dim are unset): captions are ignored")
        return None, None
    cached = _cached_text(config)
    if cached is not None:
        _check_text_width(model, cached["width"], f"the latent cache data.path={config.data.path}")
        if config.text.max_length != cached["max_length"]:
            raise ValueError(f"text.max_length={config.text.max_length}, but the latent cache data.path="
                             f"{config.data.path} holds captions of {cached['max_length']} tokens")
        if loaded is not None:  # previews encode prompts with it: it must be the cache's encoder
            described = loaded[0].describe()
            differing = sorted(k for k in described if described[k] != cached.get(k))
            if differing:
                raise ValueError(f"text.encoder_path / tokenizer_path differ from the text encoder the latent cache "
                                 f"data.path={config.data.path} was made with (in {differing})")
        null = sources.LatentSource(config.data.path).empty_caption()
    elif loaded is None:
        raise ValueError(f"the model takes text {list(keys)} (model.context_dim / pooled_dim): set "
                         "text.encoder_path and text.tokenizer_path (captions are encoded on the fly), or "
                         "train on a latent cache made with them (data.source='latents')")
    else:
        encoder, params = loaded
        _check_text_width(model, encoder.width, f"text.encoder_path={config.text.encoder_path}")
        frozen["text_encoder"] = params
        null = encoder.null_condition(params)
    frozen["null_text"] = {key: jnp.asarray(null[key]) for key in keys}
    encode_text = loaded[0] if "text_encoder" in frozen else None
    if not config.train.preview_every:
        return encode_text, None
    prompts, _ = text_encoding.prompts_from_config(config.sample)
    if loaded is None or not prompts:
        raise ValueError(f"train.preview_every={config.train.preview_every}: previews of a text-conditioned model "
                         "need prompts (sample.prompts or sample.prompts_file) and the text encoder "
                         "(text.encoder_path, text.tokenizer_path); or set train.preview_every=0")
    return encode_text, text_encoding.PromptConditions(*loaded, prompts, keys)


def _image_task_setup(config: Any, model: DiT) -> ImageTask | None:
    """The `image_task` section, checked against the model and the data (ValueError naming the field)."""
    image_task = ImageTask.from_config(config.image_task)
    if image_task is None:
        if model.concat_channels or model.noise_level_conditioning:
            raise ValueError(f"model.concat_channels={model.concat_channels}, noise_level_conditioning="
                             f"{model.noise_level_conditioning}: these take image conditions; set image_task.kind "
                             f"to one of {image_tasks.KINDS}")
        return None
    image_task.check_model(model)
    if config.data.source == "latents":
        raise ValueError(f"image_task.kind={image_task.kind!r} builds its conditions from images: data.source="
                         "'latents' has none (train on images, encoded on the fly with vae.path)")
    if image_task.kind == "inpaint" and not config.data.get("inpaint_masks"):
        raise ValueError("image_task.kind='inpaint' needs random masks: set data.inpaint_masks, e.g. "
                         "('box', 'stroke')")
    if image_task.kind == "upscale" and config.data.image_size % image_task.low_res_size:
        raise ValueError(f"image_task.low_res_size={image_task.low_res_size} does not divide data.image_size="
                         f"{config.data.image_size}")
    return image_task


def _preview_inputs(config: Any, image_task: ImageTask | None, count: int) -> dict[str, np.ndarray]:
    """What image-task previews condition on: the first `count` data images, with the right half
    masked (inpaint) or downsampled (upscale); {} without an image task."""
    if image_task is None:
        return {}
    images = preview_images(config, count)
    if len(images) < count:
        raise ValueError(f"train.preview_every: the previews of an image task need {count} data images "
                         f"(sample.grid_rows x grid_cols); the data has {len(images)}")
    if image_task.kind == "upscale":
        return {"image": np.asarray(image_tasks.downsample(images, image_task.low_res_size))}
    mask = np.zeros(images.shape[:-1] + (1,), np.float32)
    mask[:, :, images.shape[2] // 2:] = 1.0
    return {"image": images, "mask": mask}


def diffusion_task(config: Any) -> Task:
    model = backbone_from_config(config.model)
    image_task = _image_task_setup(config, model)
    objective = objectives.objective_from_config(config.diffusion, learn_sigma=model.learn_sigma)
    encode_images, frozen, decoder, vae, identity = None, {}, generation.LatentDecoder(), None, None
    if config.vae.path:
        vae, frozen["vae"], identity = bundles.load_vae(config.vae.path)
    elif config.data.source != "latents":
        logging.info("no vae.path: diffusion runs in pixel space on %s images", config.data.source)
    data = pipeline.resolve_config(config.data)
    cache = sources.LatentSource(data.path) if data.source == "latents" else None
    latents = latent_space.training_record(data, config.vae.path, identity, cache)
    if latents["space"] == "latents":
        shift, scale = latent_space.as_arrays(latents)
        decoder = generation.LatentDecoder(vae, shift, scale)
        if cache is None:
            encode_images = functools.partial(_encode_images, vae, scale, shift)
    encode_text, prompts = _text_setup(config, model, frozen)
    sample_shape = model.sample_shape

    def init_params(key):
        y = generation.example_conditions(model)
        return model.init(key, jnp.zeros((1,) + sample_shape), jnp.zeros((1,)), y)["params"]

    loss_fn = functools.partial(steps.diffusion_loss_fn, model=model, objective=objective, encode_images=encode_images,
                                encode_text=encode_text, image_task=image_task)
    # Previews sample as `ldm-jax sample` does (inference/sampling.py): same sampler, guidance and grid.
    generator = generation.Generator.from_config(
        config.sample, model, objective.schedule, objectives.sampler_from_config(config.sample, objective), decoder, image_task
    )
    rows, cols = config.sample.grid_rows, config.sample.grid_cols
    labels = generation.grid_labels(rows, cols, model.num_classes)  # row r: class r and prompt r (mod their number)
    text = prompts(generation.grid_labels(rows, cols, len(prompts.prompts))) if prompts else None
    image_inputs = _preview_inputs(config, image_task, rows * cols) if config.train.preview_every else {}

    def preview(params, frozen_params, key):
        images = generator(params, frozen_params.get("vae"), key, np.arange(rows * cols), labels, text,
                           frozen_params.get("null_text"), **image_inputs)
        return generation.image_grid(generation.to_uint8(images), rows)

    def export(path, params):
        metadata = {"task": "diffusion", "latents": latents, "diffusion": config.diffusion.to_dict()}
        if image_task is not None:
            metadata["image_task"] = image_task.describe()
        if text_encoding.text_keys(model):
            metadata["text"] = {k: config.text[k] for k in ("encoder_path", "tokenizer_path", "max_length",
                                                            "skip_last_layers")}
        # The run re-exports its own <workdir>/model (a rerun after the last step): replacing it is intended.
        serialization.save_model(path, model, params, metadata=metadata, overwrite=True)

    return Task(model, init_params, loss_fn, frozen, preview, export)


def preview_images(config: Any, count: int) -> np.ndarray:
    """The first `count` images of the data source, preprocessed: [count, S, S, 3] in [-1, 1]."""
    data = pipeline.resolve_config(config.data)
    source = pipeline.make_source(data)
    return np.stack([
        transforms.to_unit_range(transforms.center_crop_arr(transforms.to_pil_rgb(source[i]["image"]), data.image_size))
        for i in range(min(count, len(source)))
    ])


def autoencoder_task(config: Any) -> Task:
    vae = module_from_config(AutoencoderKL, config.model, "model")
    loss_config = dict(config.vae_loss)
    discriminator = module_from_config(NLayerDiscriminator, loss_config.pop("discriminator"), "vae_loss.discriminator")
    if discriminator.norm == "batch":
        raise ValueError("vae_loss.discriminator.norm='batch' keeps running statistics, which the train "
                         "loop does not thread; use 'group' (default) or 'none'")
    lpips = load_lpips_or_none(loss_config)
    for field in ("lpips_vgg_path", "lpips_lins_path"):
        loss_config.pop(field, None)
    loss = vae_losses.VAELoss(discriminator=discriminator, lpips=lpips[0] if lpips else None, **loss_config)
    size = config.data.image_size
    if size % vae.downsample_factor:
        raise ValueError(f"data.image_size={size} is not divisible by the VAE's downsampling factor "
                         f"{vae.downsample_factor}")
    images = jnp.asarray(preview_images(config, 64))
    decoder_last_layer = ("decoder", "conv_out", "kernel")

    def init_params(key):
        vae_key, disc_key = jax.random.split(key)
        x = jnp.zeros((1, size, size, vae.in_channels))
        return {"autoencoder": vae.init(vae_key, x)["params"], "discriminator": discriminator.init(disc_key, x)["params"]}

    def loss_fn(params, frozen, batch, key, step):
        x = batch["image"]
        posterior = vae.apply({"params": params["autoencoder"]}, x, method=vae.encode)
        x_rec, last_layer_vjp = vae_losses.apply_with_param_vjp(
            lambda p, z: vae.apply({"params": p}, z, method=vae.decode),
            params["autoencoder"], decoder_last_layer, posterior.sample(key),
        )
        g_loss, (_, metrics) = loss.generator_loss(
            x, x_rec, posterior, loss.init_logvar(), step, last_layer_vjp,
            jax.lax.stop_gradient(params["discriminator"]), {}, frozen,
        )
        d_loss, (_, d_metrics) = loss.discriminator_loss(params["discriminator"], {}, x, x_rec, step)
        return g_loss + d_loss, {**metrics, **d_metrics}

    def preview(params, frozen, key):
        recon, _ = vae.apply({"params": params["autoencoder"]}, images[:32])
        pairs = jnp.stack([images[:32], recon], axis=1).reshape((-1,) + images.shape[1:])
        return generation.image_grid(generation.to_uint8(pairs), 8)

    def export(path, params):
        # LDM's recipe: scale latents to unit variance (scaling_factor = 1 / std of z over data).
        posterior = vae.apply({"params": params["autoencoder"]}, images, method=vae.encode)
        z = posterior.sample(jax.random.PRNGKey(0))
        scaled = vae.clone(scaling_factor=float(1.0 / jnp.std(z)))
        serialization.save_model(path, scaled, params["autoencoder"], metadata={"task": "autoencoder"},
                                 overwrite=True)  # the run's own <workdir>/model, as above

    return Task(vae, init_params, loss_fn, lpips[1] if lpips else None, preview, export)


def make_task(config: Any) -> Task:
    if config.task not in TASKS:
        raise ValueError(f"task={config.task!r}: allowed values are {TASKS}")
    return {"diffusion": diffusion_task, "autoencoder": autoencoder_task}[config.task](config)
