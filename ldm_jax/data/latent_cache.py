"""Caching VAE latents: encode a dataset once, train on array_record shards of posteriors.

The cache stores each example's posterior mean AND std (not one sampled z): training then draws a
fresh z = mean + std * eps every epoch, as LDM does when it encodes on the fly, and the mode
(z = mean) stays available (`data.latent_sample=False`). With `flip=True` it also stores the
posterior of the mirrored image, so the flip augmentation survives caching (the reader picks one
of the two at random). Per-channel sums are kept per shard for "channel" normalisation, beside the
shard's sha256 and size, which the reader checks (`sources.LatentSource`). The file
format and the reader are in `sources.py` (`LatentSource`).

Given a text encoder (`text_encoding.text_encoder_from_config(config.text)`), each caption's
text embeddings ("context" [L, D], "context_mask" [L], "pooled" [D]) are cached in its record too,
and the empty caption's beside them (`sources.EMPTY_CAPTION`): training on the cache then never
runs the text encoder, and its caption dropout uses the same encoder's empty caption.

Resumable and multi-host: shard k holds examples [k * shard_size, (k + 1) * shard_size) and is
written by process k % process_count, first under a temporary name, renamed when complete. A rerun
skips finished shards and rewrites unfinished ones (a killed run leaves only a hidden `.<shard>.tmp` file; a run
that fails removes its `.tmp` files). A full disk is reported as one OSError(ENOSPC) naming the cache.

The cache may be a `gs://` folder: array_record writes only local files, so each file is written
to a local temporary file and uploaded when complete (`storage.staged_file`), a shard's sums first
and the shard itself last. One object upload is atomic, so a shard's object is its commit marker: a
reader (`sources.LatentSource`, which checks every shard) never takes a half-written cache for a
complete one, and a killed run leaves nothing in the bucket for a rerun to trip on.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
from array_record.python import array_record_module
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from ldm_jax import progress, storage
from ldm_jax.conditioning import text_encoding
from ldm_jax.data import pipeline
from ldm_jax.data import sources
from ldm_jax.data import transforms
from ldm_jax.inference import bundles
from ldm_jax.models import serialization
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import partitioning

FORMAT_VERSION = 1
STORE_DTYPES = ("float32", "float16")
# images [B, H, W, 3] in [-1, 1] -> (mean, std) or a posterior with .mean / .std, each [B, h, w, C]
EncodeFn = Callable[[jax.Array], Any]


def posterior_moments(encode_fn: EncodeFn, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(mean, std)`, each `[B, h, w, C]`, from an encoder returning a `(mean, std)` pair or an
    object with `.mean` and `.std` (a diagonal-Gaussian posterior)."""
    out = encode_fn(images)
    if isinstance(out, (tuple, list)):
        mean, std = out
    else:
        mean, std = out.mean, out.std
    return mean, std


def _encode_variants(encode_fn: EncodeFn, flip: bool, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images `[B, H, W, 3]` -> (mean, std) `[B, V, h, w, C]`; V = 2 (image, mirror) when flip."""
    variants = [images, transforms.hflip(images)] if flip else [images]
    moments = [posterior_moments(encode_fn, v) for v in variants]
    return jnp.stack([m for m, _ in moments], axis=1), jnp.stack([s for _, s in moments], axis=1)


def _encode_batch(encode_fn: EncodeFn, flip: bool, encode_text: Callable | None, images: jax.Array,
                  tokens: tuple[jax.Array, jax.Array] | None) -> tuple[jax.Array, jax.Array, dict]:
    """(mean, std) of `_encode_variants`, and the text conditions of tokens (ids, mask) `[B, L]`."""
    mean, std = _encode_variants(encode_fn, flip, images)
    return mean, std, (encode_text(*tokens) if encode_text is not None else {})


def _stored(array: np.ndarray, dtype: str) -> np.ndarray:
    """Floating-point arrays in the cache's dtype; others (masks) as they are."""
    return array.astype(dtype) if array.dtype.kind == "f" else array


def _write_empty_caption(out_dir: str, text: tuple[Any, Any], dtype: str) -> None:
    """The empty caption's text conditions (in the stored dtype, as the cached ones) -> EMPTY_CAPTION."""
    encoder, params = text
    null = {k: _stored(v, dtype) for k, v in encoder.null_condition(params).items()}
    with storage.staged_file(os.path.join(out_dir, sources.EMPTY_CAPTION)) as tmp, open(tmp, "wb") as f:
        np.savez(f, **null)


class _WithIndex(grain.transforms.MapWithIndex):
    """Adds the example's position in the source as `"index"`."""

    def map_with_index(self, index: int, element: dict[str, Any]) -> dict[str, Any]:
        return {**element, "index": index}


def _image_batches(
    source: Sequence[dict[str, Any]],
    ranges: list[tuple[int, int]],
    image_size: int,
    batch: int,
    num_threads: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches (the last one short) of the examples in `ranges`, in order, center-cropped, unflipped:
    `{"image": float32 [b, S, S, 3] in [-1, 1], "index": [b], "label" | "caption": [b]}`."""
    if not ranges:
        return iter([])
    indexed = grain.MapDataset.source(source).map_with_index(_WithIndex())
    dataset = grain.MapDataset.concatenate([indexed[start:stop] for start, stop in ranges])
    dataset = dataset.random_map(transforms.CropFlipToUnitRange(image_size, random_flip=False), seed=0)
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch)
    return iter(dataset.to_iter_dataset(read_options).batch(batch))


def _write_json_atomic(path: str, content: Any) -> None:
    with storage.staged_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)


def _check_or_write_meta(
    out_dir: str, meta: dict[str, Any], process_index: int, write_first: Callable[[], None] | None = None
) -> None:
    """Writes meta.json (process 0), or checks that an existing cache was made the same way.

    `write_first()` runs just before a new meta.json is written (files the meta vouches for)."""
    path = os.path.join(out_dir, sources.LATENT_META)
    if storage.path(path).is_file():
        old = sources.read_latent_meta(out_dir)
        changed = sorted(k for k in meta if k != "source" and old.get(k) != meta[k])
        if changed:
            raise ValueError(
                f"{out_dir!r} holds a latent cache made with other settings "
                f"({', '.join(f'{k}: {old.get(k)!r} -> {meta[k]!r}' for k in changed)}); "
                "use another output folder"
            )
    elif process_index == 0:
        if write_first is not None:
            write_first()
        _write_json_atomic(path, meta)


class _ShardWriter:
    """Writes one shard under a temporary name, with its per-channel sums and its bytes' sha256 and
    size (`storage.digest`, which readers check); `finish` renames it (uploads it, for a gs:// cache)."""

    def __init__(self, path: str):
        self.path = path
        if storage.staging_path(storage.path(path)).exists() or storage.path(path).exists():
            logging.warning("Rewriting unfinished shard %s (left by an interrupted run)", path)
        self._staging = storage.staged_file(path)
        self._local = self._staging.__enter__()
        self._writer = array_record_module.ArrayRecordWriter(self._local, "group_size:1")
        self.count = 0
        self._sums: dict[str, np.ndarray] = {}

    def write(self, record: dict[str, Any]) -> None:
        self._writer.write(sources.encode_latent_record(record))
        mean = record["mean"].astype(np.float64)
        var = record["std"].astype(np.float64) ** 2
        channel_axes = tuple(range(mean.ndim - 1))
        sums = {
            "count": np.float64(mean.size // mean.shape[-1]),
            "sum_mean": mean.sum(channel_axes),
            "sum_mean_sq": (mean**2).sum(channel_axes),
            "sum_var": var.sum(channel_axes),
        }
        self._sums = {k: self._sums.get(k, 0) + v for k, v in sums.items()}
        self.count += 1

    def finish(self) -> None:
        self._writer.close()
        sums = {k: np.asarray(v).tolist() for k, v in self._sums.items()}
        _write_json_atomic(self.path + ".json", sums | storage.digest(self._local))
        self._staging.__exit__(None, None, None)

    def abort(self, error: BaseException) -> None:
        """Removes the unfinished shard after `error` (closing a writer whose write failed raises that
        error again)."""
        with contextlib.suppress(RuntimeError):
            self._writer.close()
        self._staging.__exit__(type(error), error, error.__traceback__)


@contextlib.contextmanager
def _aborting_on_failure(writers: dict[int, _ShardWriter]) -> Iterator[None]:
    """Aborts the shards still open in `writers` when the block fails: a failed run leaves no `.tmp`."""
    try:
        yield
    except BaseException as error:
        for writer in writers.values():
            writer.abort(error)
        raise


def cache_latents(
    source: Sequence[dict[str, Any]],
    encode_fn: EncodeFn,
    out_dir: str,
    *,
    image_size: int,
    downsample_factor: int,
    batch_size: int,
    sharding: NamedSharding | None = None,
    flip: bool = True,
    shard_size: int = 1024,
    dtype: str = "float32",
    num_threads: int = 4,
    process_index: int | None = None,
    process_count: int | None = None,
    log_every_s: float = 30.0,
    text: tuple[Any, Any] | None = None,
    vae: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Encodes every example of `source` and writes the latent cache to `out_dir`; returns its meta.

    Args:
      source: random-access image source (`sources.*Source`), elements `{"image", "label" | "caption"}`.
      encode_fn: images `[B, image_size, image_size, 3]` in [-1, 1] -> `(mean, std)` or a posterior
        with `.mean`/`.std`, each `[B, image_size / downsample_factor, ..., C]`; traced under jit.
      out_dir: the cache folder (created); rerunning on it resumes.
      image_size: images are `center_crop_arr`-ed to this size (no random flip).
      downsample_factor: the VAE's spatial factor; `image_size` must be a multiple of it.
      batch_size: global encode batch over all hosts; divisible by the processes and batch shards.
      sharding: batch sharding of the encode (default: the leading axis over all devices).
      flip: also store the posterior of each mirrored image (doubles the encoding work).
      shard_size: examples per shard.
      dtype: stored dtype of mean/std, one of `STORE_DTYPES`.
      num_threads: grain threads decoding images on this host.
      process_index, process_count: which shards this host writes (k % count == index); default
        `jax.process_index()` / `jax.process_count()`.
      log_every_s: seconds between progress lines.
      text: (`text_encoding.TextEncoder`, its params): also cache each caption's text
        embeddings (the source must give captions) and the empty caption's (module docstring).
      vae: the encoding VAE's `latent_space.vae_identity` (weights sha256, scaling/shift factors),
        recorded in the meta: training checks it against vae.path and normalises by it.
    """
    if image_size % downsample_factor:
        raise ValueError(
            f"image_size={image_size} is not divisible by the VAE downsampling factor {downsample_factor}"
        )
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; use one of {STORE_DTYPES}")
    if shard_size <= 0:
        raise ValueError(f"shard_size={shard_size} must be positive")
    if sharding is None:
        mesh = jax.make_mesh(
            (jax.device_count(), 1, 1), partitioning.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3
        )
        sharding = pipeline.batch_sharding(mesh)
    per_host = pipeline.per_host_batch_size(batch_size, sharding, jax.process_count())
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count

    first = source[0]
    encode_text, text_meta, text_length = None, None, 0
    if text is not None:
        if "caption" not in first:
            raise ValueError(f"text.encoder_path: {source!r} gives no captions to encode (image folders with .txt "
                             "files, data.caption_key for TFDS, or data.caption_template)")
        encoder, text_params = text
        replicated = NamedSharding(sharding.mesh, PartitionSpec())
        encode_text = functools.partial(encoder, jax.device_put(text_params, replicated))
        text_meta, text_length = encoder.describe(), encoder.max_length
    encode = jax.jit(
        functools.partial(_encode_batch, encode_fn, flip, encode_text), in_shardings=sharding, out_shardings=sharding
    )
    image_shape = (image_size, image_size, 3)
    tokens_struct = None if text is None else (jax.ShapeDtypeStruct((batch_size, text_length), jnp.int32),) * 2
    latent = encode.eval_shape(jax.ShapeDtypeStruct((batch_size,) + image_shape, jnp.float32), tokens_struct)[0]
    latent_size = image_size // downsample_factor
    if latent.shape[2:4] != (latent_size, latent_size):
        raise ValueError(
            f"encode_fn maps {image_size}x{image_size} images to latents {latent.shape[2:]}, not "
            f"{latent_size}x{latent_size} (downsample_factor={downsample_factor})"
        )
    class_names = getattr(source, "class_names", None)
    sizes = sources.latent_shard_sizes(len(source), shard_size)
    meta = {
        "format_version": FORMAT_VERSION,
        "num_examples": len(source),
        "shard_size": shard_size,
        "num_shards": len(sizes),
        "image_size": image_size,
        "downsample_factor": downsample_factor,
        "latent_shape": list(latent.shape[2:]),
        "variants": latent.shape[1],
        "dtype": dtype,
        "fields": [f for f in ("label", "caption") if f in first],
        "class_names": list(class_names) if class_names else None,
        "text": text_meta,
        "vae": vae,
        "source": repr(source),
    }
    write_first = None if text is None else functools.partial(_write_empty_caption, out_dir, text, dtype)
    with serialization.reporting_disk_full(out_dir):
        storage.path(out_dir).mkdir(parents=True, exist_ok=True)
        _check_or_write_meta(out_dir, meta, process_index, write_first)

    paths = [sources.latent_shard_path(out_dir, k, len(sizes)) for k in range(len(sizes))]
    mine = [k for k in range(len(sizes)) if k % process_count == process_index]
    pending = [k for k in mine if not sources.latent_shard_complete(paths[k], sizes[k])]
    num_pending = sum(sizes[k] for k in pending)
    logging.info(
        "cache_latents: process %d writes %d of %d shards (%d already done), %d examples -> %s",
        process_index, len(mine), len(sizes), len(mine) - len(pending), num_pending, out_dir,
    )  # fmt: skip
    # Every host runs the same number of (globally sharded) encode steps; idle ones feed zeros.
    local_steps = -(-num_pending // per_host)
    steps = int(np.max(multihost_utils.process_allgather(np.int32(local_steps))))
    ranges = [(k * shard_size, k * shard_size + sizes[k]) for k in pending]
    batches = _image_batches(source, ranges, image_size, per_host, num_threads)

    writers: dict[int, _ShardWriter] = {}
    done, start, last_log = 0, time.time(), time.time()
    with serialization.reporting_disk_full(out_dir), _aborting_on_failure(writers), \
            progress.bar(num_pending, "encode") as bar:
        for _ in range(steps):
            batch = next(batches, None)
            inputs = {"image": np.zeros((per_host,) + image_shape, np.float32)}
            if text is not None:
                inputs.update({name: np.zeros((per_host, text_length), np.int32) for name in ("ids", "mask")})
            valid = 0 if batch is None else len(batch["index"])
            if batch is not None:
                inputs["image"][:valid] = batch["image"]
                if text is not None:
                    inputs["ids"][:valid], inputs["mask"][:valid] = text[0].tokenize([str(c) for c in batch["caption"]])
            inputs = pipeline.to_global(inputs, sharding)
            tokens = None if text is None else (inputs["ids"], inputs["mask"])
            outputs = encode(inputs["image"], tokens)
            outputs = multihost_utils.global_array_to_host_local_array(
                outputs, sharding.mesh, jax.tree.map(lambda _: sharding.spec, outputs)
            )
            mean, std = (np.asarray(m)[:valid].astype(dtype) for m in outputs[:2])
            embeddings = {k: np.asarray(v)[:valid] for k, v in outputs[2].items()}
            for row in range(valid):
                index = int(batch["index"][row])
                shard = index // shard_size
                if shard not in writers:
                    writers[shard] = _ShardWriter(paths[shard])
                record = {"index": index, "mean": mean[row], "std": std[row]}
                record.update({f: batch[f][row].item() for f in meta["fields"]})
                record.update({k: _stored(v[row], dtype) for k, v in embeddings.items()})
                writers[shard].write(record)
                if writers[shard].count == sizes[shard]:
                    writers[shard].finish()
                    del writers[shard]
            done += valid
            bar.update(valid)
            if time.time() - last_log >= log_every_s:
                last_log = time.time()
                rate = done / (last_log - start)
                logging.info(
                    "cache_latents: %d/%d examples (%.1f/s, %.0f s left)",
                    done, num_pending, rate, (num_pending - done) / max(rate, 1e-9),
                )  # fmt: skip
    elapsed = time.time() - start
    logging.info("cache_latents: process %d done, %d examples in %.1f s", process_index, done, elapsed)
    return meta


def cache_from_config(config: Any, out_dir: str, shard_size: int) -> dict[str, Any]:
    """`ldm-jax encode`: the config's data set encoded by the VAE bundle `vae.path` (and its captions
    by `text.*`, when set) into a latent cache at `out_dir`, sharded over the config's mesh; -> its meta."""
    mesh_lib.initialize_distributed(config.distributed)
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    data = pipeline.resolve_config(config.data)
    vae, params, identity = bundles.load_vae(config.vae.path)
    params = jax.device_put(params, mesh_lib.replicated(mesh))

    def encode(images):
        return vae.apply({"params": params}, images, method=vae.encode)

    return cache_latents(
        pipeline.make_source(data), encode, out_dir, image_size=data.image_size,
        downsample_factor=vae.downsample_factor, batch_size=data.batch_size,
        sharding=pipeline.batch_sharding(mesh), flip=data.random_flip, shard_size=shard_size,
        num_threads=data.num_threads, text=text_encoding.text_encoder_from_config(config.text), vae=identity,
    )
