"""grain input pipelines that yield global, mesh-sharded `jax.Array` batches.

    source ─ seeded shuffle (one global order, new each epoch) ─ repeat
           ─ random_map (crop + flip + [-1, 1], or latent variant + sample + normalise)
           ─ batch (per-host batches of b = B / P) ─ this host's batches [slot::P]
           ─ to_iter_dataset (threads) ─ [mp_prefetch]
           ─ jax.make_array_from_process_local_data (the mesh's batch sharding)

Every host builds the same global stream; with P processes, global batch k is the concatenation
of per-host batches k·P + s over host slots s = 0..P-1, and host s reads (and decodes) only its own
per-host batches. Rows [s·b, (s+1)·b) of a global batch come from the host in slot s, which is
the process whose devices hold those rows (`host_slot`; on a process-major mesh, such as
`jax.make_mesh` builds, the slot is `jax.process_index()`). So the sequence of global batches does
not depend on the number of processes.

Per-example randomness comes from grain's `random_map` generator, seeded by the pipeline seed and
the element's position in the global stream (so by epoch and index, not by host): the same example
at the same position gets the same flip / noise whatever the process count, and a pipeline
restored with `set_state` yields exactly the batches an uninterrupted one would.

Epochs: repeat comes before batching, so batches flow across epoch boundaries (the last global
batch of an epoch may end with examples of the next one); every global batch is full and all hosts
run the same number of steps. With `num_epochs > 0` the stream ends after
`num_epochs * len(source) // B` global batches; the remaining examples are not read.

Batches: `{"image": float32 [B, S, S, 3] in [-1, 1], "label": int32 [B]}` for image sources (plus
`"mask"` float32 [B, S, S, 1], 1 = hole, with `data.inpaint_masks`: random boxes / brush strokes),
`{"latent": float32 [B, h, w, C], "label": int32 [B]}` for latent caches. Captions (image folders'
.txt files, a TFDS text feature `data.caption_key`, or `data.caption_template` filled with class
names) become, in this order of preference: the cached text embeddings of a latent cache made with
a text encoder (`"context"` [B, L, D], `"context_mask"` [B, L] bool, `"pooled"` [B, D]); token ids
`"input_ids"`, `"attention_mask"` int32 [B, L] when a tokenizer is given (`text.tokenizer_path`);
else `"caption"`, a host-local numpy array of this host's strings `[B / process_count]` (not a
jax.Array, so not a batch a jitted step takes).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from ldm_jax import latent_space
from ldm_jax.data import sources as sources_lib
from ldm_jax.data import transforms
from ldm_jax.data.tokenizer import CLIPTokenizer
from ldm_jax.parallel import partitioning

SOURCES = ("digits", "image_folder", "tfds", "latents")


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of a config, with every field the pipeline reads."""
    return ml_collections.ConfigDict(
        dict(
            source="digits",  # one of SOURCES
            name="",  # TFDS dataset name, e.g. "imagenet2012" (source="tfds")
            data_dir="",  # TFDS data_dir ("" = TFDS' default)
            path="",  # image folder (source="image_folder") or latent cache dir (source="latents")
            split="train",
            image_key="image",  # TFDS feature names
            label_key="label",  # "" = unlabelled
            caption_key="",  # TFDS text feature holding captions ("" = none)
            caption_template="",  # captions from labels, e.g. "the digit {name}" ("" = none)
            caption_class_names=(),  # the {name} of each class (() = the source's class names)
            image_size=32,  # images are center-cropped to image_size x image_size
            batch_size=64,  # GLOBAL batch, over all hosts
            seed=0,
            shuffle=True,
            num_epochs=0,  # 0 = repeat forever
            random_flip=True,  # images: flip half; latents: pick a cached flip variant
            num_threads=4,  # grain read threads per process
            prefetch_batches=2,  # host-side buffer, in batches
            num_workers=0,  # mp_prefetch worker processes (0 = in-process)
            check_images=True,  # image folders: decode every file up front, skip bad ones
            strict=False,  # image folders: bad files raise instead of being skipped
            inpaint_masks=(),  # random inpainting masks per image ("box", "stroke"): the batch's "mask"
            latent_sample=True,  # latents: z = mean + std * eps (False: z = mean, the mode)
            # latents = (z - shift) * scale: "vae" (the VAE's own scaling/shift factors), "channel"
            # (a latent cache's per-channel statistics) or "scale" (the two fields below): latent_space.py
            latent_norm="vae",
            latent_scale=1.0,
            latent_shift=0.0,
        )
    )


def resolve_config(config: Any) -> ml_collections.ConfigDict:
    """`default_config()` updated with `config`; ValueError on unknown fields or values."""
    resolved = default_config()
    unknown = sorted(set(config.keys()) - set(resolved.keys()))
    if unknown:
        raise ValueError(f"unknown data config field(s) {unknown}; known: {sorted(resolved.keys())}")
    resolved.update(dict(config.items()))
    if resolved.source not in SOURCES:
        raise ValueError(f"data.source={resolved.source!r}; use one of {SOURCES}")
    if resolved.latent_norm not in latent_space.NORMS:
        raise ValueError(f"data.latent_norm={resolved.latent_norm!r}; use one of {latent_space.NORMS}")
    unknown_masks = sorted(set(resolved.inpaint_masks) - set(transforms.INPAINT_MASKS))
    if unknown_masks:
        raise ValueError(f"data.inpaint_masks={tuple(resolved.inpaint_masks)}: unknown kind(s) {unknown_masks}; "
                         f"use some of {transforms.INPAINT_MASKS}")
    if resolved.inpaint_masks and resolved.source == "latents":
        raise ValueError("data.inpaint_masks: masks are drawn on images, and data.source='latents' holds latents "
                         "(inpainting models encode the masked image: train on images with vae.path)")
    for field in ("image_size", "batch_size"):
        if resolved[field] <= 0:
            raise ValueError(f"data.{field}={resolved[field]} must be positive")
    return resolved


def make_source(config: Any) -> Any:
    """The random-access source a resolved `data` config names (see `sources`), with captions from
    `data.caption_template` when set."""
    if config.source == "digits":
        source = sources_lib.DigitsSource(config.split)
    elif config.source == "image_folder":
        source = sources_lib.ImageFolderSource(
            config.path,
            check_images=config.check_images,
            strict=config.strict,
            num_threads=config.num_threads,
        )
    elif config.source == "tfds":
        source = sources_lib.TfdsSource(
            config.name,
            config.split,
            config.data_dir or None,
            image_key=config.image_key,
            label_key=config.label_key or None,
            caption_key=config.caption_key or None,
        )
    else:
        source = sources_lib.LatentSource(config.path)
    if config.caption_template:
        source = sources_lib.LabelCaptions(source, config.caption_template, tuple(config.caption_class_names))
    return source


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The training mesh's batch sharding: leading axis over the `activation_batch` mesh axes."""
    return partitioning.mesh_shardings(PartitionSpec("activation_batch"), mesh)


def per_host_batch_size(global_batch: int, sharding: NamedSharding, process_count: int) -> int:
    """`global_batch / process_count`, after checking it splits over hosts and batch shards."""
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    num_shards = math.prod(sharding.mesh.shape[a] for a in axes)
    if global_batch % process_count or global_batch % num_shards:
        raise ValueError(
            f"data.batch_size={global_batch} must be divisible by the number of processes "
            f"({process_count}) and of batch shards ({num_shards}, mesh axes {axes})"
        )
    return global_batch // process_count


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
    """This host's batch `{k: [b, ...]}` -> global `jax.Array`s `[b * process_count, ...]`.

    String arrays (captions) stay host-local numpy arrays.
    """
    out = {}
    for key, value in local_batch.items():
        if value.dtype.kind in "USO":
            out[key] = value
            continue
        value = value.astype(jax.dtypes.canonicalize_dtype(value.dtype), copy=False)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def host_slot(sharding: NamedSharding, global_batch: int) -> int:
    """This process's slot: which per-host block of rows it holds in every global batch `[B, ...]`.

    `jax.make_array_from_process_local_data` puts a process's rows where its devices' shards are.
    Processes are ranked by the first batch row their devices hold, so the slot-s host's rows are
    `[s * b, (s + 1) * b)` whenever each process holds one contiguous block (any device order that
    keeps a process's devices together along the batch axes; `jax.process_index()` on a
    process-major mesh). A mesh that interleaves processes along the batch axes still gets disjoint
    per-host batches, but their rows are spread over the global batch in that interleaved order.
    """
    first_row: dict[int, int] = {}
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        start = index[0].start or 0
        first_row[device.process_index] = min(first_row.get(device.process_index, global_batch), start)
    ranked = sorted(first_row, key=lambda process: (first_row[process], process))
    return ranked.index(jax.process_index())


def example_transform(config: Any, source: Any) -> tuple[Any, tuple[np.ndarray, np.ndarray] | None]:
    """The per-example grain transform for `config`, and the latent `(shift, scale)` (None for images)."""
    if config.source == "latents":
        shift, scale = (np.asarray(v, np.float32) for v in latent_space.normalisation(config, None, source))
        transform = transforms.LatentFromPosterior(config.latent_sample, config.random_flip, shift, scale)
        return transform, (shift, scale)
    return transforms.CropFlipToUnitRange(config.image_size, config.random_flip), None


def caption_transform(text: Any) -> transforms.TokenizeCaption | None:
    """The caption tokenizer of a `text` config section (None: no text.tokenizer_path)."""
    if not text or not text.get("tokenizer_path"):
        return None
    return transforms.TokenizeCaption(CLIPTokenizer.from_folder(text["tokenizer_path"]), text["max_length"])


def make_grain_dataset(
    config: Any,
    source: Sequence[dict[str, Any]],
    transform: Any,
    *,
    per_host_batch: int,
    process_index: int,
    process_count: int,
    tokenize: transforms.TokenizeCaption | None = None,
) -> grain.IterDataset:
    """This host's grain pipeline of numpy batches (see the module docstring for the stages).

    `transform`: a grain `RandomMap` applied per example (from `example_transform`).
    `process_index`: this host's slot in the global batch (`host_slot`), of `process_count`.
    The global batch is `per_host_batch * process_count`; only this host's examples are read.
    `tokenize`: captions -> token ids, after `transform` (`caption_transform`).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    dataset = grain.MapDataset.source(source).seed(config.seed)
    if config.shuffle:
        dataset = dataset.shuffle()
    dataset = dataset.repeat(config.num_epochs or None)
    # After repeat, an element's index is its position in the global stream: it seeds the rng.
    dataset = dataset.random_map(transform)
    if config.inpaint_masks:  # its own seed: masks independent of the crop / flip draws
        dataset = dataset.random_map(transforms.RandomInpaintMask(tuple(config.inpaint_masks), config.image_size),
                                     seed=config.seed + 1)
    if tokenize is not None:
        dataset = dataset.map(tokenize)
    dataset = dataset.batch(per_host_batch, drop_remainder=True)
    # Whole global batches only, so every host yields the same number of batches.
    num_global = len(dataset) // process_count
    if num_global == 0:
        raise ValueError(
            f"data.batch_size={per_host_batch * process_count}: {len(source)} examples x "
            f"data.num_epochs={config.num_epochs} make no full global batch"
        )
    dataset = dataset[process_index : num_global * process_count : process_count]
    # Each read thread assembles one whole per-host batch: buffer at least one batch per thread.
    dataset = dataset.to_iter_dataset(
        grain.ReadOptions(
            num_threads=config.num_threads,
            prefetch_buffer_size=max(config.prefetch_batches, config.num_threads),
        )
    )
    if config.num_workers > 0:
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.num_workers, per_worker_buffer_size=config.prefetch_batches
            )
        )
    return dataset


class GlobalBatchIterator(Iterator[dict[str, Any]]):
    """Global batches from a host's grain pipeline, with checkpointable position.

    `iterator` is the grain `DatasetIterator` itself (hand it to orbax via
    `grain.checkpoint.CheckpointSave(iterator)`); `get_state`/`set_state` are its JSON-serialisable
    state. Nothing is read ahead beyond grain's own buffers, so the state is always the position
    after the last batch returned. A state restores into a pipeline with the same data config
    (seed, batch size, num_workers, ...). The position it records counts global batches, the same
    on every host, so a state also restores with another number of processes.
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        sharding: NamedSharding,
        *,
        class_names: Sequence[str] | None,
        latent_norm: tuple[np.ndarray, np.ndarray] | None,
    ):
        self.iterator = iter(dataset)
        self.sharding = sharding
        self.class_names = class_names
        # (shift, scale): latent = (z - shift) * scale; decode z = latent / scale + shift.
        self.latent_norm = latent_norm

    def __next__(self) -> dict[str, Any]:
        return to_global(next(self.iterator), self.sharding)

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)

    def close(self) -> None:
        """Stops mp_prefetch worker processes, if any."""
        self.iterator.close()


def make_pipeline(config: Any, sharding: NamedSharding, text: Any = None) -> GlobalBatchIterator:
    """Global batches for the `data` config, laid out by `sharding` (e.g. `batch_sharding(mesh)`).

    Each host reads only its `batch_size / process_count` rows of every global batch (its
    `host_slot` of `jax.process_count()`); the global batches are those of a single process.
    With `num_workers > 0`, grain worker processes are spawned: absl flags must be parsed and the
    entry point guarded by `if __name__ == "__main__"`.
    `text`: the config's `text` section; with text.tokenizer_path set, captions are tokenized to
    text.max_length tokens (module docstring).
    """
    config = resolve_config(config)
    source = make_source(config)
    process_count = jax.process_count()
    per_host = per_host_batch_size(config.batch_size, sharding, process_count)
    transform, latent_norm = example_transform(config, source)
    dataset = make_grain_dataset(
        config,
        source,
        transform,
        per_host_batch=per_host,
        process_index=host_slot(sharding, config.batch_size),
        process_count=process_count,
        tokenize=caption_transform(text),
    )
    return GlobalBatchIterator(
        dataset, sharding, class_names=getattr(source, "class_names", None), latent_norm=latent_norm
    )
