"""Inception features of many images: batched, jitted, sharded over the devices; image readers.

    extractor = InceptionFeatures(module, params, batch_size=64, mesh=mesh)
    acts = extractor.extract(read_images("samples.npz", 64))   # {"pool": [N, 2048], ...}

Images are uint8 [N, H, W, 3] (as ADM's sample / reference batches store them), divided by 255
on the device and handed to `InceptionV3`, which resizes them to 299 and maps them to [-1, 1]
(pytorch-fid's pipeline). Every batch is padded to `batch_size` (one compile) and split over all
devices of the mesh; outputs come back replicated, so every process gets all features (each
process reads all images).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import zipfile
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
from PIL import Image

from ldm_jax.data.sources import IMAGE_EXTENSIONS
from ldm_jax.models.inception import InceptionV3

OUTPUTS = ("pool", "spatial", "logits_unbiased")


class InceptionFeatures:
    """Jitted `InceptionV3` over uint8 batches. `mesh=None`: one device, else the batch axis is
    split over all of the mesh's devices (`batch_size` must be a multiple of their number)."""

    def __init__(self, module: InceptionV3, params: Any, *, batch_size: int = 64, mesh: jax.sharding.Mesh | None = None):
        num_devices = 1 if mesh is None else mesh.size
        if batch_size < 1 or batch_size % num_devices:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the {num_devices} devices")
        self.batch_size = batch_size
        self.mesh = mesh

        def features(params, images):
            return module.apply({"params": params}, images.astype(jnp.float32) / 255.0)

        if mesh is None:
            self.params = jax.device_put(params)
            self._batch_sharding = None
            self._fn = jax.jit(features)
        else:
            replicated = NamedSharding(mesh, PartitionSpec())
            self.params = jax.device_put(params, replicated)
            self._batch_sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
            self._fn = jax.jit(features, in_shardings=(replicated, self._batch_sharding), out_shardings=replicated)

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

    def extract(self, batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
        """Features of all images of `batches` (each uint8 [b, H, W, 3]), concatenated in order.

        The next batch is read while the devices work on the current one.
        """
        parts, pending = [], None
        for batch in batches:
            started = self._dispatch(batch)
            if pending is not None:
                parts.append(self._fetch(pending))
            pending = started
        if pending is None:
            raise ValueError("no images to compute Inception features of")
        parts.append(self._fetch(pending))
        return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUTS}


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _array_names(archive: zipfile.ZipFile) -> list[str]:
    return sorted(n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy"))


@contextlib.contextmanager
def _npz_member(path: str, key: str) -> Iterator[tuple[Any, tuple[int, ...], np.dtype]]:
    """(open stream positioned at the data, shape, dtype) of array `key` in the `.npz` at `path`."""
    with zipfile.ZipFile(path) as archive:
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


def npz_image_batches(path: str, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Streams uint8 images [N, H, W, 3] from array `key` of an ADM-style `.npz`, `batch_size` at a
    time, without loading the whole array (a 50k x 256^2 batch is 9.8 GB)."""
    with _npz_member(path, key) as (f, shape, dtype):
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{path}: {key!r} must be uint8 images [N, H, W, 3], got {dtype} {shape}")
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            raw = f.read(count * per_image)
            if len(raw) != count * per_image:
                raise ValueError(f"{path}: {key!r} is truncated at image {start}")
            yield np.frombuffer(raw, np.uint8).reshape((count,) + tuple(shape[1:]))


def image_files(folder: str) -> list[str]:
    """Image files (by extension) below `folder`, recursively, sorted by path; hidden ones skipped."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not an existing folder")
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(f"{folder!r} holds no images (extensions {IMAGE_EXTENSIONS})")
    return files


def _read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def folder_image_batches(folder: str, batch_size: int, num_threads: int = 8) -> Iterator[np.ndarray]:
    """uint8 [b, H, W, 3] batches of the images below `folder` (sorted; all of one size)."""
    files = image_files(folder)
    size = None
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for start in range(0, len(files), batch_size):
            names = files[start : start + batch_size]
            images = list(pool.map(_read_rgb, names))
            for name, image in zip(names, images):
                size = size or image.shape
                if image.shape != size:
                    raise ValueError(f"{name} is {image.shape[:2]}, the first image {files[0]} is {size[:2]}: sizes must match")
            yield np.stack(images)


def read_images(path: str, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of uint8 images from a sample `.npz` (`arr_0`) or a folder of image files."""
    if os.path.isdir(path):
        return folder_image_batches(path, batch_size)
    if path.endswith(".npz") and os.path.isfile(path):
        return npz_image_batches(path, batch_size)
    raise ValueError(f"{path!r} is neither a folder of images nor an existing .npz file")


def npz_keys(path: str) -> list[str]:
    """Names of the arrays in an `.npz` (without loading them)."""
    with zipfile.ZipFile(path) as archive:
        return _array_names(archive)
