"""Inception features of many images: batched, jitted, sharded over the devices; image readers.

    extractor = InceptionFeatures(module, params, batch_size=64, mesh=mesh)
    acts = extractor.extract_set(open_images("samples.npz"))   # {"pool": [N, 2048], ...}

Images are uint8 [N, H, W, 3] (as ADM's sample / reference batches store them), divided by 255
on the device and handed to `InceptionV3`, which resizes them to 299 and maps them to [-1, 1]
(pytorch-fid's pipeline). Every batch is padded to `batch_size` (one compile) and split over all
devices of the mesh; outputs come back replicated, so every process gets all features (each
process reads all images). Every reader takes a local path or a `gs://` URI (`storage`).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import time
import zipfile
import zlib
from typing import Any, Callable, Iterable, Iterator, Sequence

from absl import logging

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from ldm_jax import progress, storage
from ldm_jax.data import transforms
from ldm_jax.data import sources
from ldm_jax.data.sources import IMAGE_EXTENSIONS, read_image
from ldm_jax.models.inception import InceptionV3

OUTPUTS = ("pool", "spatial", "logits_unbiased")
PROGRESS_SECONDS = 30.0


@functools.lru_cache(maxsize=None)
def _features_fn(module: InceptionV3, mesh: jax.sharding.Mesh | None) -> Any:
    """The jitted `(params, uint8 images) -> features` for a network and mesh; shared by every
    extractor of the same (module, mesh), so it compiles once per image shape in a process."""

    def features(params, images):
        return module.apply({"params": params}, images.astype(jnp.float32) / 255.0)

    if mesh is None:
        return jax.jit(features)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    return jax.jit(features, in_shardings=(replicated, batch), out_shardings=replicated)


class InceptionFeatures:
    """Jitted `InceptionV3` over uint8 batches. `mesh=None`: one device, else the batch axis is
    split over all of the mesh's devices (`batch_size` must be a multiple of their number)."""

    def __init__(self, module: InceptionV3, params: Any, *, batch_size: int = 64, mesh: jax.sharding.Mesh | None = None):
        num_devices = 1 if mesh is None else mesh.size
        if batch_size < 1 or batch_size % num_devices:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the {num_devices} devices")
        self.module = module
        self.batch_size = batch_size
        self.mesh = mesh
        self._fn = _features_fn(module, mesh)
        if mesh is None:
            self.params = jax.device_put(params)
            self._batch_sharding = None
        else:
            self.params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
            self._batch_sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))

    def feature_sizes(self) -> dict[str, int]:
        """{"pool": D, "spatial": Ds, "logits_unbiased": C} of this network (no compute)."""
        images = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)  # resized to image_size inside
        out = jax.eval_shape(self.module.apply, {"params": self.params}, images)
        return {k: int(out[k].shape[1]) for k in OUTPUTS}

    def _dispatch(self, images: np.ndarray) -> tuple[dict[str, jax.Array], int]:
        """Starts the features of one batch on the devices (asynchronously); returns them and b."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
        b = len(images)
        if not 0 < b <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} images, got {b}")
        padded = np.concatenate([images, np.zeros((self.batch_size - b,) + images.shape[1:], np.uint8)])
        batch = padded if self._batch_sharding is None else jax.device_put(padded, self._batch_sharding)
        return self._fn(self.params, batch), b

    @staticmethod
    def _fetch(pending: tuple[dict[str, jax.Array], int]) -> dict[str, np.ndarray]:
        out, b = pending
        return {k: np.asarray(out[k])[:b] for k in OUTPUTS}

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images uint8 [b <= batch_size, H, W, 3] -> {"pool": [b, 2048], "spatial": [b, 2023],
        "logits_unbiased": [b, 1008]} float32 numpy."""
        return self._fetch(self._dispatch(images))

    def extract(self, batches: Iterable[np.ndarray], *, total: int | None = None, name: str = "images",
                log_every: float = PROGRESS_SECONDS) -> dict[str, np.ndarray]:
        """Features of all images of `batches` (each uint8 [b, H, W, 3]), concatenated in order.

        The next batch is read while the devices work on the current one. Progress (images done of
        `total`, images/s) is logged every `log_every` seconds and at the end, as `name`.
        """
        parts, pending = [], None
        start = last_log = time.monotonic()
        done = 0

        def log(now):
            of = "" if total is None else f"/{total}"
            logging.info("Inception features of %s: %d%s images, %.1f images/s", name, done, of,
                         done / max(now - start, 1e-9))

        with progress.bar(total, f"Inception features of {name}") as bar:
            for batch in batches:
                started = self._dispatch(batch)
                if pending is not None:
                    parts.append(self._fetch(pending))
                    done += pending[1]
                    bar.update(pending[1])
                pending = started
                now = time.monotonic()
                if now - last_log >= log_every:
                    log(now)
                    last_log = now
            if pending is None:
                raise ValueError(f"{name}: no images to compute Inception features of")
            parts.append(self._fetch(pending))
            done += pending[1]
            bar.update(pending[1])
        log(time.monotonic())
        return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUTS}

    def extract_set(self, images: ImageSet) -> dict[str, np.ndarray]:
        """`extract` of all images of an `ImageSet`, with progress against its size."""
        return self.extract(images.batches(self.batch_size), total=images.num_images, name=images.name)


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _array_names(archive: zipfile.ZipFile) -> list[str]:
    return sorted(n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy"))


# What reading a damaged `.npz` raises: not a zip (truncated, or another kind of file), a corrupt entry.
_DAMAGED_NPZ = (zipfile.BadZipFile, zlib.error, EOFError)


@contextlib.contextmanager
def reading_npz(path: str) -> Iterator[None]:
    """Re-raises what reading the damaged `.npz` at `path` raises (`_DAMAGED_NPZ`) as one ValueError naming it."""
    try:
        yield
    except _DAMAGED_NPZ as error:
        raise ValueError(f"{path}: not a readable .npz file ({type(error).__name__}: {error}); is it truncated, "
                         "or another kind of file?") from error


@contextlib.contextmanager
def _npz_member(path: str, key: str) -> Iterator[tuple[Any, tuple[int, ...], np.dtype]]:
    """(open stream positioned at the data, shape, dtype) of array `key` in the `.npz` at `path`."""
    with reading_npz(path), storage.path(path).open("rb") as file, zipfile.ZipFile(file) as archive:
        if f"{key}.npy" not in archive.namelist():
            raise ValueError(f"{path}: no array {key!r} (arrays: {_array_names(archive)})")
        with archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version not in _HEADER_READERS:
                raise ValueError(f"{path}: array {key!r} has .npy format version {version}; expected 1.0 or 2.0")
            shape, fortran, dtype = _HEADER_READERS[version](f)
            if fortran or dtype.hasobject:
                raise ValueError(f"{path}: array {key!r} must be a C-ordered numeric array")
            yield f, shape, dtype


def _image_array_shape(path: str, key: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: {key!r} must be uint8 images [N, H, W, 3], got {dtype} {shape}")
    return tuple(shape)


def npz_image_batches(path: str, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Streams uint8 images [N, H, W, 3] from array `key` of an ADM-style `.npz`, `batch_size` at a
    time, without loading the whole array (a 50k x 256^2 batch is 9.8 GB)."""
    with _npz_member(path, key) as (f, shape, dtype):
        shape = _image_array_shape(path, key, shape, dtype)
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            raw = f.read(count * per_image)
            if len(raw) != count * per_image:
                raise ValueError(f"{path}: {key!r} is truncated at image {start}")
            yield np.frombuffer(raw, np.uint8).reshape((count,) + shape[1:])


def image_files(folder: str) -> list[str]:
    """Image files (by extension) below `folder`, recursively (`sources.image_files`); hidden ones skipped."""
    if not storage.path(folder).is_dir():
        raise ValueError(f"{folder!r} is not an existing folder")
    files = sources.image_files(folder, recursive=True)
    if not files:
        raise ValueError(f"{folder!r} holds no images (extensions {IMAGE_EXTENSIONS})")
    return files


def _threaded_batches(
    read: Callable[[int], np.ndarray], describe: Callable[[int], str], count: int, batch_size: int, num_threads: int
) -> Iterator[np.ndarray]:
    """uint8 [b, H, W, 3] batches of `read(i)`, i = 0..count-1, read by a thread pool; all images
    must have the size of the first (`describe(i)` names image i in the error)."""
    size = None
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for start in range(0, count, batch_size):
            indices = range(start, min(start + batch_size, count))
            images = list(pool.map(read, indices))
            for i, image in zip(indices, images):
                size = size or image.shape
                if image.shape != size:
                    raise ValueError(f"{describe(i)} is {image.shape[:2]}, the first image {describe(0)} is "
                                     f"{size[:2]}: sizes must match")
            yield np.stack(images)


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images to compute features of: `batches(batch_size)` yields uint8 [b, H, W, 3] in a fixed
    order. `name` says what they are (logs, errors); `num_images` is known before reading."""

    name: str
    num_images: int
    batches: Callable[[int], Iterator[np.ndarray]]


def npz_images(path: str, key: str = "arr_0") -> ImageSet:
    """The images of array `key` of an `.npz` (its header checked now: uint8 [N, H, W, 3])."""
    with _npz_member(path, key) as (_, shape, dtype):
        shape = _image_array_shape(path, key, shape, dtype)
    return ImageSet(f"{path} ({key})", shape[0], functools.partial(npz_image_batches, path, key=key))


def folder_images(folder: str, num_threads: int = 8) -> ImageSet:
    """The image files below `folder` (see `image_files`), all of one size; a file that cannot be read
    (or a decompression bomb) stops the reading with a ValueError naming it (`sources.read_image`)."""
    files = image_files(folder)
    batches = functools.partial(_threaded_batches, lambda i: np.asarray(read_image(files[i])), files.__getitem__,
                                len(files), num_threads=num_threads)
    return ImageSet(folder, len(files), batches)


def source_images(source: Sequence[dict[str, Any]], image_size: int, name: str, num_threads: int = 8) -> ImageSet:
    """The images of a `data.sources` source (elements `{"image": PIL or uint8 array, ...}`), each
    center-cropped to `image_size` as training sees them (`transforms.center_crop_arr`; no flip)."""

    def read(i: int) -> np.ndarray:
        return transforms.center_crop_arr(source[i]["image"], image_size)

    batches = functools.partial(_threaded_batches, read, lambda i: f"{name} element {i}", len(source),
                                num_threads=num_threads)
    return ImageSet(name, len(source), batches)


def open_images(path: str) -> ImageSet:
    """The images of a sample `.npz` (`arr_0`) or of a folder of image files."""
    if storage.path(path).is_dir():
        return folder_images(path)
    if path.endswith(".npz") and storage.path(path).is_file():
        return npz_images(path)
    raise ValueError(f"{path!r} is neither a folder of images nor an existing .npz file")


def npz_keys(path: str) -> list[str]:
    """Names of the arrays in an `.npz` (without loading them)."""
    with reading_npz(path), storage.path(path).open("rb") as file, zipfile.ZipFile(file) as archive:
        return _array_names(archive)
