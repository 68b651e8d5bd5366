"""The files `ldm-jax sample` writes in its out_dir, and the checks that make a restart resume.

    protocol.json   everything that determines the samples
    grid.png        the sample grid
    samples.npz     arr_0 uint8 [N, H, W, 3], arr_1 int32 labels [N] (ADM's convention)
    chunks/<start>-<end>.npz   while sampling: images, labels, indices of [start, end) and their
                               sha256 (written with them, checked when a restart reuses the chunk:
                               a damaged chunk is sampled again, with a warning naming it)

Every file is written atomically (`storage.staged_file`: renamed into place locally, uploaded as one
object to a `gs://` out_dir, where a reader sees it whole or not at all); `samples.npz` is streamed
from the chunks (one chunk in memory) with fixed zip timestamps, so the same samples give the same
bytes.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from typing import Any

import numpy as np
from absl import logging

from ldm_jax import storage

SAMPLES_FILE = "samples.npz"
PROTOCOL_FILE = "protocol.json"
GRID_FILE = "grid.png"
# Protocol fields that may change between a run and its restart: the weights' hashes cover them.
_MOVABLE_FIELDS = ("model_path", "vae.path", "text.encoder_path", "text.tokenizer_path", "text.prompts_file")
# Fixed zip member timestamps: the same samples give a byte-identical samples.npz.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_CHUNK_ARRAYS = ("images", "labels", "indices")  # a chunk's arrays; its member "sha256" is their checksum


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}.{key}".lstrip(".")).items()}


def protocol_differences(stored: dict, protocol: dict) -> list[str]:
    """Dotted names of the fields in which two protocols differ (the movable paths aside)."""
    a, b = _flatten(stored), _flatten(protocol)
    names = sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))
    return [name for name in names if name not in _MOVABLE_FIELDS]


def chunk_ranges(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def chunk_path(out_dir: str, start: int, end: int) -> str:
    return storage.join(out_dir, "chunks", f"{start}-{end}.npz")


def chunk_files(out_dir: str) -> list[str]:
    directory = storage.path(out_dir) / "chunks"
    return [p.name for p in directory.iterdir() if p.name.endswith(".npz")] if directory.is_dir() else []


def _arrays_sha256(chunk: dict[str, np.ndarray]) -> str:
    """sha256 over a chunk's arrays (name, dtype, shape and bytes of each, in `_CHUNK_ARRAYS` order)."""
    digest = hashlib.sha256()
    for name in _CHUNK_ARRAYS:
        array = np.ascontiguousarray(chunk[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_chunk(path: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    """Writes a chunk atomically, with its arrays' sha256 (member "sha256"), which `read_chunk` checks."""
    chunk = {"images": images, "labels": labels, "indices": indices}
    write_atomic(path, lambda f: np.savez(f, **chunk, sha256=np.array(_arrays_sha256(chunk))))


def read_chunk(path: str, start: int, end: int, image_shape: tuple[int, ...]) -> dict[str, np.ndarray] | None:
    """The chunk's arrays if the file is whole, matches the sha256 recorded at write and holds exactly the
    indices [start, end); else None, with a warning naming a chunk that is there but is not that."""
    if not storage.path(path).exists():
        return None
    try:
        with np.load(io.BytesIO(storage.path(path).read_bytes())) as data:
            chunk = {name: data[name] for name in _CHUNK_ARRAYS}
            recorded = str(data["sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        problem = f"unreadable: {error}"
    else:
        n = end - start
        valid = (chunk["images"].shape == (n, *image_shape) and chunk["images"].dtype == np.uint8
                 and chunk["labels"].shape == (n,) and np.array_equal(chunk["indices"], np.arange(start, end)))
        problem = ("checksum mismatch" if recorded != _arrays_sha256(chunk) else
                   None if valid else f"not the samples [{start}, {end}) of shape {image_shape}")
    if problem:
        logging.warning("sample chunk %s is damaged (%s): it is not reused", path, problem)
        return None
    return chunk


def write_atomic(path: str, write: Any) -> None:
    """`write(file)` into a local file, flushed to disk, then published at `path` (`storage.staged_file`)."""
    with storage.staged_file(path) as local, open(local, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _npz_shapes(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{member: (shape, dtype)} of an .npz from the .npy headers alone (nothing loaded)."""
    shapes = {}
    with storage.path(path).open("rb") as file, zipfile.ZipFile(file) as archive:
        for name in archive.namelist():
            with archive.open(name) as f:
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
                shape, _, dtype = read_header(f)
                shapes[name.removesuffix(".npy")] = (shape, dtype)
    return shapes


def complete(path: str, num_samples: int, image_shape: tuple[int, ...], with_labels: bool) -> bool:
    """Whether `path` is a finished samples.npz of this many images of this shape (and labels)."""
    try:
        shapes = _npz_shapes(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False
    return shapes.get("arr_0") == ((num_samples, *image_shape), np.dtype(np.uint8)) and \
        (not with_labels or shapes.get("arr_1", ((),))[0] == (num_samples,))


def assemble(out_dir: str, ranges: list[tuple[int, int]], image_shape: tuple[int, ...], with_labels: bool,
              path: str) -> None:
    """Streams the chunks, in index order, into `path` (arr_0 images, arr_1 labels if `with_labels`),
    checking that they hold every index 0..N-1 exactly once; one chunk in memory at a time."""
    num_samples = ranges[-1][1]
    labels = np.zeros(num_samples, np.int32)
    counts = np.zeros(num_samples, np.int64)

    def member(archive, name):
        return archive.open(zipfile.ZipInfo(name, date_time=_ZIP_DATE), "w", force_zip64=True)

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with member(archive, "arr_0.npy") as out:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": (num_samples, *image_shape)}
                np.lib.format.write_array_header_1_0(out, header)
                for start, end in ranges:
                    chunk = read_chunk(chunk_path(out_dir, start, end), start, end, image_shape)
                    if chunk is None:
                        raise RuntimeError(f"chunk {chunk_path(out_dir, start, end)} is missing or damaged")
                    out.write(np.ascontiguousarray(chunk["images"]).tobytes())
                    labels[start:end] = chunk["labels"]
                    np.add.at(counts, chunk["indices"], 1)
            if not np.all(counts == 1):
                raise RuntimeError(f"chunks hold indices {np.flatnonzero(counts != 1)[:10]}... not exactly once")
            if with_labels:
                with member(archive, "arr_1.npy") as out:
                    np.lib.format.write_array(out, labels)

    write_atomic(path, write)
    logging.info("wrote %d samples to %s", num_samples, path)

