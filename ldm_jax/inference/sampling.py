"""`ldm-jax sample`: a trained or converted DiT -> a PNG grid and an ADM-evaluator `.npz`, sharded
over every device of every host, resumable, every sample reproducible on its own.

    <out_dir>/protocol.json   everything that determines the samples (written first)
    <out_dir>/grid.png        sample.grid_rows x grid_cols; row r shows class r mod num_classes
                              (text-conditioned models: prompt r mod the number of prompts)
    <out_dir>/samples.npz     sample.num_samples > 0: arr_0 uint8 [N, H, W, 3], arr_1 int32 labels [N]
                              (class-conditional models; ADM's convention), or for text-conditioned
                              models the index of each sample's prompt
    <out_dir>/chunks/<start>-<end>.npz   while sampling: images, labels, indices of [start, end)

Sample i draws all its randomness from `fold_in(PRNGKey(sample.seed), i)` (`generation.Generator`)
and its class from the same key or from i (`sample.labels`), so its noise and class are the same
whatever batch, chunk, device count or host count generates it; its pixels agree to float rounding
(XLA blocks each matmul by the per-device batch: README), bit for bit for the same batch_size on as
many devices. Chunk k holds the samples [k·B, (k+1)·B) with
B = sample.batch_size (one global batch, the last one padded and trimmed: one compiled program);
each is written atomically, so a killed run restarted with the same config skips the chunks it has
and writes the rest. When all are there they are streamed into `samples.npz` (memory: one chunk)
and removed. A restart whose protocol differs from the stored one fails, naming the fields, rather
than mixing samples of two protocols (delete the out_dir to start afresh).

The model is the bundle at sample.model_path (default `<workdir>/model`, what `train` exports; the
`model` config section is not used). What the bundle was trained with comes from the bundle: the
diffusion objective (`diffusion`, which the config must not contradict) and the latent space (its
VAE, found at the recorded path unless vae.path is set, and the latent normalisation:
`latent_space.py`); the sampler and guidance come from `sample`. Parameters are laid out on the mesh
by the logical axis rules; only process 0 writes files. The workdir, out_dir, the bundles, the image
and the mask may be local paths or `gs://` URIs (`storage`); a restart resumes the same on both.

Text-conditioned models: sample i uses prompt i mod P of sample.prompts (the CLI's --prompt) or of
sample.prompts_file, encoded by the frozen text encoder of the `text` section; guidance pairs it with
the empty caption. The protocol records the prompts (or the file's path and sha256), the tokenizer's
and the encoder's weights' sha256 and the text settings.

Image tasks (`sample.task` / --task, sample.image / --image, sample.mask / --mask): every sample
inpaints or upscales the one image. Inpainting (a mask given, or a checkpoint trained with
image_task.kind="inpaint"): the image is the output's size, the mask (white = fill) the image's; any
DiT inpaints training-free (RePaint: sample.jump_length, jump_n_sample), one trained to inpaint also
takes the mask and masked image as its concat conditions. Upscaling (a checkpoint trained with
image_task.kind="upscale"): the image is image_task.low_res_size pixels square, noise-augmented to
sample.noise_level (default: the training config's image_task.noise_level). The protocol records the
files' sha256.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import ldm_jax
from ldm_jax import progress, storage
from ldm_jax.conditioning import image_tasks, text_encoding
from ldm_jax.conditioning.image_tasks import ImageTask
from ldm_jax.data import sources, transforms
from ldm_jax.diffusion import objectives
from ldm_jax.inference import bundles, generation, sample_files
from ldm_jax.inference.sample_files import GRID_FILE, PROTOCOL_FILE, SAMPLES_FILE
from ldm_jax.models import serialization
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import partitioning


def sample_from_config(config: Any, workdir: str, devices: Any = None) -> dict[str, str]:
    """Writes the grid, the samples (sample.num_samples > 0) and the protocol; returns their paths.

    devices: the devices to sample on (default: all devices of all hosts, `config.mesh` over them).
    """
    mesh_lib.initialize_distributed(config.distributed)
    settings = config.sample
    _check_settings(settings)
    out_dir = os.fspath(storage.path(settings.out_dir or storage.join(workdir, "samples")))
    mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
    num_shards = math.prod(mesh.shape[axis] for axis in mesh_lib.BATCH_AXES)
    if settings.batch_size % num_shards:
        raise ValueError(f"sample.batch_size={settings.batch_size} must be divisible by the {num_shards} batch "
                         f"shards (mesh axes {' x '.join(mesh_lib.BATCH_AXES)})")
    generator, params, vae_params, prompts, image_inputs, protocol = _load(config, workdir, mesh)
    _claim(out_dir, protocol)
    suspects = (f"sample.guidance_scale={settings.guidance_scale}, sample.sampler={settings.sampler}, "
                f"sample.num_steps={settings.num_steps}, or the weights in {protocol['model_path']}")
    sample = _BatchSampler(generator, params, vae_params, settings.seed, settings.batch_size, mesh, prompts,
                           image_inputs, suspects=suspects)

    rows, cols = settings.grid_rows, settings.grid_cols
    grid = sample(np.arange(rows * cols), generation.grid_labels(rows, cols, sample.num_conditions))
    outputs = {"grid": storage.join(out_dir, GRID_FILE)}
    if _is_leader():
        generation.save_png(generation.image_grid(grid, rows), outputs["grid"])
    if settings.num_samples:
        outputs["samples"] = _sample_chunks(sample, out_dir, settings, protocol)
    outputs["protocol"] = storage.join(out_dir, PROTOCOL_FILE)
    return outputs


def _check_settings(settings: Any) -> None:
    if settings.labels not in generation.LABEL_MODES:
        raise ValueError(f"sample.labels={settings.labels!r}: allowed values are {generation.LABEL_MODES}")
    if settings.num_samples < 0:
        raise ValueError(f"sample.num_samples={settings.num_samples} must be >= 0")
    if settings.batch_size < 1:
        raise ValueError(f"sample.batch_size={settings.batch_size} must be >= 1")
    if settings.grid_rows < 1 or settings.grid_cols < 1:
        raise ValueError(f"sample.grid_rows={settings.grid_rows}, grid_cols={settings.grid_cols} must be >= 1")


def _prompt_conditions(config: Any, model: Any, where: str, image_task: ImageTask | None) -> tuple[Any, dict | None]:
    """(the prompts' conditions, their protocol) for a text-conditioned model; (None, None) otherwise.
    ValueError for prompts given to a model without text, and for a model whose conditions
    `ldm-jax sample` cannot supply (naming them)."""
    fields = model.condition_fields()
    keys = text_encoding.text_keys(model)
    supplied = {"label", *text_encoding.TEXT_KEYS, *(("concat", "noise_level") if image_task else ())}
    unsupported = sorted(set(fields) - supplied)
    if unsupported or (keys and model.num_classes):
        raise ValueError(f"{where}: a DiT conditioned on {sorted(fields)}; `ldm-jax sample` samples class-conditional, "
                         "text-conditioned and unconditional DiTs, and ones trained with an image_task (inpaint, "
                         "upscale; recorded in model.json)")
    prompts, prompts_protocol = text_encoding.prompts_from_config(config.sample)
    if not keys:
        if prompts:
            name = "sample.prompts_file" if config.sample.prompts_file else "--prompt / sample.prompts"
            raise ValueError(f"{name}: {where} is not text-conditioned (it takes {sorted(fields) or 'no condition'}); "
                             "sample it without prompts")
        return None, None
    loaded = text_encoding.text_encoder_from_config(config.text)
    if loaded is None or not prompts:
        raise ValueError(f"{where}: a DiT conditioned on {list(keys)} needs prompts (--prompt, sample.prompts or "
                         "sample.prompts_file) and its text encoder (text.encoder_path, text.tokenizer_path)")
    encoder, text_params = loaded
    protocol = {**prompts_protocol, **encoder.describe(),
                "encoder_path": os.fspath(storage.path(config.text.encoder_path)),
                "tokenizer_path": os.fspath(storage.path(config.text.tokenizer_path)),
                "weights_sha256": serialization.params_sha256(text_params)}
    return text_encoding.PromptConditions(encoder, text_params, prompts, keys), protocol


def _load(config: Any, workdir: str, mesh: jax.sharding.Mesh) -> tuple[generation.Generator, Any, Any, Any, dict, dict]:
    """(generator, params laid out on the mesh, VAE params replicated, prompt conditions or None, the
    image task's inputs (`_image_inputs`), protocol)."""
    settings = config.sample
    field = "sample.model_path" if settings.model_path else "sample.model_path (unset: <workdir>/model)"
    model_path = os.fspath(storage.path(settings.model_path or storage.join(workdir, "model")))
    bundles.require_bundle(model_path, field)
    if config.vae.path:
        bundles.require_bundle(os.fspath(storage.path(config.vae.path)), "vae.path")
    model, params, metadata = serialization.load_model(model_path)
    bundles.check_backbone(model, model_path, field)
    image_task = ImageTask.from_config(metadata.get("image_task"))
    prompts, text_protocol = _prompt_conditions(config, model, f"{field}={model_path}", image_task)
    weights_sha256 = serialization.params_sha256(params)
    params = _place(params, _param_shardings(model, mesh))

    decoder, vae_params, vae_protocol = bundles.latent_decoder(config, metadata.get("latents"), f"{field}={model_path}")
    if vae_params is not None:
        vae_params = _place(vae_params, jax.tree.map(lambda _: mesh_lib.replicated(mesh), vae_params))

    diffusion = bundles.trained_diffusion(config, metadata.get("diffusion"), f"{field}={model_path}")
    objective = objectives.objective_from_config(diffusion, learn_sigma=model.learn_sigma)
    sampler = objectives.sampler_from_config(settings, objective)
    generator = generation.Generator.from_config(settings, model, objective.schedule, sampler, decoder, image_task)
    image_inputs, image_protocol = _image_inputs(settings, generator, vae_params, f"{field}={model_path}")
    protocol = {
        "model": serialization.module_config(model),
        "model_path": model_path,
        "weights_sha256": weights_sha256,
        "diffusion": dict(diffusion),
        "sampler": dataclasses.asdict(sampler),
        "guidance": {"scale": generator.guidance_scale, "interval": generator.guidance_interval,
                     "guided_channels": generator.guided_channels},
        "vae": vae_protocol,
        "seed": settings.seed,
        "labels": settings.labels,
        "num_samples": settings.num_samples,
        "batch_size": settings.batch_size,
        "image_shape": generator.image_shape(vae_params),
        "versions": {"ldm_jax": ldm_jax.__version__, "jax": jax.__version__},
    }
    if text_protocol is not None:
        protocol["text"] = text_protocol
    if image_protocol is not None:
        protocol["image_task"] = image_protocol
    return generator, params, vae_params, prompts, image_inputs, json.loads(json.dumps(protocol))


def _read_image(path: str, field: str, mode: str) -> np.ndarray:
    """An image file as uint8 [H, W, 3] (mode "RGB") or [H, W] ("L"), 16-bit and float files scaled
    by their range (`transforms.to_8bit`); FileNotFoundError / ValueError naming the field."""
    if not storage.path(path).is_file():
        raise FileNotFoundError(f"{field}={path}: no such file")
    try:
        return np.asarray(sources.read_image(path, mode))
    except ValueError as error:  # unreadable, or a decompression bomb: named by the reader
        raise ValueError(f"{field}: {error}") from error


def _image_inputs(settings: Any, generator: generation.Generator, vae_params: Any,
                  where: str) -> tuple[dict[str, np.ndarray], dict | None]:
    """The image (and mask) every sample inpaints or upscales, without a batch axis, and their protocol;
    ({}, None) for plain generation. ValueError naming the field for a task the checkpoint was not
    trained for, or an image / mask of the wrong size."""
    trained = generator.image_task.kind if generator.image_task is not None else ""
    task = settings.task or trained or ("inpaint" if settings.mask else "")
    if task not in ("",) + image_tasks.KINDS:
        raise ValueError(f"sample.task={task!r} (--task): allowed values are {image_tasks.KINDS}")
    if task == "upscale" and trained != "upscale":
        raise ValueError(f"--task=upscale (sample.task): {where} was not trained to upscale (its image_task: "
                         f"{trained or 'none'}; train one with image_task.kind='upscale')")
    if task == "inpaint" and trained == "upscale":
        raise ValueError(f"--task=inpaint (sample.task): {where} was trained to upscale, not to inpaint")
    if not task:
        if settings.image:
            raise ValueError(f"--image (sample.image): {where} was not trained for an image task; give --mask "
                             "to inpaint the image (training-free, RePaint)")
        return {}, None
    if not settings.image:
        raise ValueError(f"{where} {'was trained to' if trained else 'asked to'} {task}: give the image "
                         "(--image, sample.image)" + (" and the mask (--mask, sample.mask)" if task == "inpaint" else ""))
    image = _read_image(settings.image, "sample.image (--image)", "RGB")
    protocol = {"task": task, "image_sha256": storage.digest(settings.image)["sha256"]}
    if task == "upscale":
        if settings.mask:
            raise ValueError("--mask (sample.mask): a mask is for inpainting; this checkpoint upscales")
        size = generator.image_task.low_res_size
        if image.shape[:2] != (size, size):
            raise ValueError(f"sample.image (--image)={settings.image} is {image.shape[1]}x{image.shape[0]}; the "
                             f"checkpoint upscales {size}x{size} images (image_task.low_res_size)")
        protocol["noise_level"] = generator.image_task.noise_level
        return {"image": transforms.to_unit_range(image)}, protocol
    if not settings.mask:
        raise ValueError("inpainting needs the mask (--mask, sample.mask): white = fill, black = keep")
    mask = _read_image(settings.mask, "sample.mask (--mask)", "L")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"sample.mask (--mask)={settings.mask} is {mask.shape[1]}x{mask.shape[0]}, but the image "
                         f"sample.image={settings.image} is {image.shape[1]}x{image.shape[0]}: they must be the same size")
    expected = tuple(generator.image_shape(vae_params)[:2])
    if image.shape[:2] != expected:
        raise ValueError(f"sample.image (--image)={settings.image} is {image.shape[1]}x{image.shape[0]}; the "
                         f"checkpoint makes {expected[1]}x{expected[0]} images")
    protocol.update(mask_sha256=storage.digest(settings.mask)["sha256"], jumps=list(generator.jumps),
                    paste_known=generator.paste_known)
    return {"image": transforms.to_unit_range(image), "mask": (mask > 127).astype(np.float32)[..., None]}, protocol


def _place(tree: Any, shardings: Any) -> Any:
    """Host-local whole arrays -> global arrays laid out by `shardings` (each process keeps its shards)."""
    return jax.tree.map(lambda leaf, sharding: _global(np.asarray(leaf), sharding), tree, shardings)


def _param_shardings(model: Any, mesh: jax.sharding.Mesh) -> Any:
    """The parameters' layout on `mesh` from their logical axis names (`partitioning`)."""
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *model.sample_shape)),
                           jnp.zeros((1,)), generation.example_conditions(model))["params"]
    return partitioning.state_shardings(boxed, mesh)


def _is_leader() -> bool:
    return jax.process_index() == 0


def _from_leader(value: np.ndarray) -> np.ndarray:
    """Process 0's `value` on every process (the leader alone reads the out_dir)."""
    return value if jax.process_count() == 1 else np.asarray(multihost_utils.broadcast_one_to_all(value))


def _claim(out_dir: str, protocol: dict) -> None:
    """Writes protocol.json, after checking that samples already in out_dir were made by the same
    protocol (ValueError naming the differing fields otherwise)."""
    problem = ""
    if _is_leader():
        path = storage.path(out_dir) / PROTOCOL_FILE
        if (storage.path(out_dir) / SAMPLES_FILE).exists() or sample_files.chunk_files(out_dir):
            if not path.exists():
                problem = f"{out_dir} holds samples but no {PROTOCOL_FILE} to check them against"
            else:
                differences = sample_files.protocol_differences(json.loads(path.read_text()), protocol)
                if differences:
                    problem = f"{out_dir} holds samples of another protocol; differing fields: {', '.join(differences)}"
        if not problem:
            sample_files.write_atomic(path, lambda f: f.write(json.dumps(protocol, indent=2, sort_keys=True).encode()))
    if _from_leader(np.int32(bool(problem))):
        raise ValueError(f"{problem or 'process 0 found samples of another protocol in ' + out_dir} "
                         "(set sample.out_dir, or delete it to start afresh)")


class _BatchSampler:
    """(indices [n], labels [n]) numpy -> uint8 images [n, H, W, C] on every process, generated in
    global batches of `batch_size` sharded over the mesh (a short last batch padded, then trimmed).
    With `prompts` (a text-conditioned model), the labels are prompt indices. `image_inputs`: the
    image (and mask) every sample inpaints or upscales, no batch axis. Non-finite images are a
    FloatingPointError naming the samples and `suspects` (the settings likely at fault), before
    anything of them is written."""

    def __init__(self, generator, params, vae_params, seed, batch_size, mesh, prompts=None, image_inputs=None, *,
                 suspects: str):
        self.generator, self.params, self.vae_params = generator, params, vae_params
        self.suspects = suspects
        self.batch_size, self.batch_sharding = batch_size, mesh_lib.batch_sharding(mesh)
        self.key = np.asarray(jax.random.PRNGKey(seed))  # raw uint32 [2], the same on every process
        self.global_key = _global(self.key, mesh_lib.replicated(mesh))
        self.prompts = prompts
        self.image_inputs = {name: _global(np.broadcast_to(value, (batch_size,) + value.shape), self.batch_sharding)
                             for name, value in (image_inputs or {}).items()}
        self.null_text = None
        if prompts is not None:
            self.null_text = {k: _global(v, mesh_lib.replicated(mesh)) for k, v in prompts.null().items()}

    @property
    def num_conditions(self) -> int:
        """What a label indexes: the prompts of a text-conditioned model, else the classes (0: none)."""
        return len(self.prompts.prompts) if self.prompts is not None else self.generator.model.num_classes

    def __call__(self, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(indices), self.batch_size):
            n = min(self.batch_size, len(indices) - start)
            padded = [np.pad(a[start:start + n], (0, self.batch_size - n), mode="edge") for a in (indices, labels)]
            index_array, label_array = (_global(a.astype(np.int32), self.batch_sharding) for a in padded)
            text = None
            if self.prompts is not None:
                text = {k: _global(v, self.batch_sharding) for k, v in self.prompts(padded[1]).items()}
            images = self.generator(self.params, self.vae_params, self.global_key, index_array, label_array, text,
                                    self.null_text, **self.image_inputs)
            images = np.asarray(multihost_utils.process_allgather(images, tiled=True)[:n])
            if not np.isfinite(images).all():
                raise FloatingPointError(f"the sampler produced non-finite values at samples {indices[start]}-"
                                         f"{indices[start + n - 1]} ({self.suspects}); nothing was written for them")
            out.append(generation.to_uint8(images))
        return np.concatenate(out)


def _global(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host array that every process holds whole."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _sample_chunks(sample: _BatchSampler, out_dir: str, settings: Any, protocol: dict) -> str:
    """Generates the chunks not yet on disk, then assembles samples.npz; returns its path."""
    path = storage.join(out_dir, SAMPLES_FILE)
    num_samples, image_shape = settings.num_samples, tuple(protocol["image_shape"])
    labelled = sample.num_conditions > 0
    complete = functools.partial(sample_files.complete, path, num_samples, image_shape, labelled)
    ranges = sample_files.chunk_ranges(num_samples, settings.batch_size)
    todo = np.zeros(len(ranges), bool)
    if _is_leader() and not complete():
        todo[:] = [sample_files.read_chunk(sample_files.chunk_path(out_dir, *r), *r, image_shape) is None for r in ranges]
    todo = _from_leader(todo)
    if todo.any():
        logging.info("sampling %d of %d chunks (%d already written) into %s", todo.sum(), len(ranges),
                     len(ranges) - todo.sum(), storage.join(out_dir, "chunks"))
    began, done = time.monotonic(), 0
    bar = progress.bar(sum(ranges[k][1] - ranges[k][0] for k in np.flatnonzero(todo)), "sample")
    for k in np.flatnonzero(todo):
        start, end = ranges[k]
        indices = np.arange(start, end)
        mode = "balanced" if sample.prompts is not None else settings.labels  # prompt i mod P
        labels = generation.sample_labels(sample.key, np.arange(start, start + settings.batch_size), mode,
                                          sample.num_conditions)[:end - start]  # one shape: one compile
        images = sample(indices, labels)
        if _is_leader():
            sample_files.write_chunk(sample_files.chunk_path(out_dir, start, end), images, labels, indices)
        done += 1
        bar.update(end - start)
        rate = done * settings.batch_size / (time.monotonic() - began)
        logging.info("chunk [%d, %d) of %d: %.1f images/s, ETA %.0f s", start, end, num_samples, rate,
                     (todo.sum() - done) * settings.batch_size / rate)
    bar.close()
    multihost_utils.sync_global_devices("ldm_jax.sample.chunks")
    if _is_leader():
        if not complete():
            sample_files.assemble(out_dir, ranges, image_shape, labelled, path)
        chunks = storage.path(out_dir) / "chunks"
        if chunks.exists():
            chunks.rmtree()
    multihost_utils.sync_global_devices("ldm_jax.sample.assembled")
    return path


