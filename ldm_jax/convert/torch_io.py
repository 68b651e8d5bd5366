"""Reading and writing PyTorch weights safely, without torch.

Two formats are read into flat `{name: np.ndarray}` dicts:
- `.safetensors` (header JSON + raw little-endian buffers; bf16 through `ml_dtypes`);
- torch's zip checkpoints (`torch.save`, `.pt`/`.pth`/`.bin`) through a *restricted* unpickler that
  only knows how to rebuild tensors, storages and plain containers. Any other global in the pickle
  (the way a malicious checkpoint runs code) raises `UnsafeCheckpointError`: this is the same
  allow-list idea as `torch.load(..., weights_only=True)`, and it needs no torch at run time.

Both readers treat the file as hostile. Besides refusing code, they check every size, offset and
stride against the bytes actually there before any view is taken or anything large is read (a
crafted view would otherwise read, or crash on, memory outside its storage), refuse zip entries
that would decompress to more than `_MAX_COMPRESSION_RATIO` times the file (zip bombs), and parse
the pickle's opcodes before running them (lengths and memo indices past its end). Whatever is wrong
with a file is reported as one `ValueError` (one line) naming it.

`check_state_dict` compares a loaded state dict with the keys and shapes a model expects and
raises one `CheckpointMismatchError` listing every missing, unexpected or wrongly shaped key.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from typing import Any, Mapping, NamedTuple

import ml_dtypes
import numpy as np

from ldm_jax import storage as storage_lib


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The checkpoint's pickle references a global outside the tensor allow-list."""


class CheckpointMismatchError(ValueError):
    """A state dict does not have the keys/shapes the model needs; lists all problems at once."""


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}

_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

# The reference implementation's limit on a safetensors JSON header.
_SAFETENSORS_MAX_HEADER = 100_000_000

# No absolute limit on a zip entry: real checkpoints reach 10 GB (SDXL) and one storage can hold
# several GB (a flattened FSDP parameter, a large embedding). Instead the entries together may not
# expand to more than this many times the file's size. torch.save stores entries uncompressed
# (ratio 1), deflated weights shrink by less than 2x, so 10x leaves room for zero-heavy tensors,
# while a zip bomb (zeros deflate about 1000:1) is refused before anything is decompressed.
_MAX_COMPRESSION_RATIO = 10

# A view may repeat storage elements (stride 0, as `Tensor.expand` makes): its copy may have more
# elements than the storage, but at most this many, so that a few bytes cannot ask for terabytes.
_MAX_REPEATED_ELEMENTS = 1 << 24


def _one_line(message: Any, limit: int = 400) -> str:
    """`message` on one line (whitespace runs collapsed), cut to `limit` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _is_index(value: Any) -> bool:
    """A non-negative integer (JSON's `true` and pickled booleans excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ----------------------------------------------------------------------------- safetensors


def _size(f) -> int:
    """The size of the open binary file `f` (left at its start)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    return size


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file (local or gs://) into `{name: array}` (copies, in the stored dtype).

    A malformed header, or offsets outside the file, raise one `ValueError` naming the file.
    """
    try:
        with storage_lib.path(path).open("rb") as f:
            header = _read_safetensors_header(f, _size(f))
            data = f.read()
        return {
            name: _safetensors_tensor(name, info, data)
            for name, info in header.items()
            if name != "__metadata__"
        }
    except ValueError as error:
        raise ValueError(f"{os.fspath(path)}: {_one_line(error)}") from None


def _read_safetensors_header(f, file_size: int) -> dict[str, Any]:
    """The JSON header after the 8-byte length, checked to fit in the file and to be an object."""
    if file_size < 8:
        raise ValueError(f"not a safetensors file: {file_size} bytes, too short for a header")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > file_size - 8:
        raise ValueError(f"header length {length} runs past the end of the {file_size}-byte file")
    if length > _SAFETENSORS_MAX_HEADER:
        raise ValueError(f"header length {length} exceeds the {_SAFETENSORS_MAX_HEADER}-byte limit")
    try:
        header = json.loads(f.read(length))
    except (ValueError, RecursionError) as error:
        raise ValueError(f"header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
    return header


def _safetensors_tensor(name: str, info: Any, data: bytes) -> np.ndarray:
    """One tensor of a safetensors file, after checking its dtype, shape and offsets into `data`."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ValueError(f"tensor {name!r}: expected an object with dtype, shape and data_offsets")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r} has unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(_is_index(n) for n in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_index(o) for o in offsets)
        and offsets[0] <= offsets[1] <= len(data)
    ):
        raise ValueError(
            f"tensor {name!r}: data_offsets {offsets!r} are not [start, end] within the "
            f"{len(data)} bytes of data"
        )
    dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
    start, end = offsets
    if end - start != math.prod(shape) * dtype.itemsize:
        raise ValueError(
            f"tensor {name!r}: shape {shape} of {dtype_name} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes, data_offsets {offsets} hold {end - start}"
        )
    return np.frombuffer(data[start:end], dtype=dtype).reshape(shape).copy()


def save_safetensors(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes `{name: array}` as `.safetensors` (atomically: `storage_lib.staged_file`; local or gs://)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    buffers, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors")
        raw = array.tobytes()
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        buffers.append(raw)
        offset += len(raw)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # 8-byte alignment, as the reference does
    with storage_lib.staged_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for raw in buffers:
            f.write(raw)


# ----------------------------------------------------------------------------- torch zip


class _StorageType(NamedTuple):
    """What a `torch.FloatStorage`-like global unpickles to: immutable, so that a pickle's BUILD
    opcode cannot swap its dtype."""

    dtype: np.dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    """torch's `_rebuild_tensor_v2`: a copy of the view (offset, size, stride) of a storage, taken
    only after `_check_view` has bounded it by the storage."""
    _check_view(storage, storage_offset, size, stride)
    if math.prod(size) == 0:
        return np.empty(tuple(size), storage.dtype)
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=tuple(size),
        # a dimension of size 1 never steps: its stride (unchecked, any size) is not used
        strides=tuple(s * itemsize if n > 1 else 0 for n, s in zip(size, stride)),
        writeable=False,
    )
    return np.array(view)


def _check_view(storage: Any, offset: Any, size: Any, stride: Any) -> None:
    """Raises `ValueError` unless the view reads only elements of the storage (a 1-D contiguous
    array): non-negative integers, and the last element reached (offset + sum((size-1)*stride),
    in Python ints, so without overflow) inside it. Empty views reach nothing."""
    if not (isinstance(storage, np.ndarray) and storage.ndim == 1 and storage.flags.c_contiguous):
        raise ValueError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    if not (
        _is_index(offset)
        and isinstance(size, (tuple, list))
        and isinstance(stride, (tuple, list))
        and len(size) == len(stride)
        and all(_is_index(v) for v in (*size, *stride))
    ):
        raise ValueError(
            f"tensor with storage offset {offset!r}, size {size!r} and stride {stride!r}: expected "
            "non-negative integers, one stride per dimension"
        )
    numel = math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if numel and last >= storage.size:
        raise ValueError(
            f"tensor of size {tuple(size)}, stride {tuple(stride)} and storage offset {offset} "
            f"reaches element {last} of a storage of {storage.size} elements"
        )
    if numel > max(storage.size, _MAX_REPEATED_ELEMENTS):
        raise ValueError(
            f"tensor of size {tuple(size)} repeats its {storage.size}-element storage into {numel} "
            f"elements (at most {_MAX_REPEATED_ELEMENTS} are allowed)"
        )


def _rebuild_parameter(data, *_unused):
    return data


class _Namespace(argparse.Namespace):
    """`argparse.Namespace` as stored in training checkpoints (e.g. DiT's `args`): data only."""


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("argparse", "Namespace"): _Namespace,
}

# What a malformed (truncated, corrupted, inconsistent) archive or pickle raises while being read.
_MALFORMED_ERRORS = (
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    EOFError,
    OverflowError,  # a pickled length beyond sys.maxsize
    RuntimeError,  # an encrypted entry; RecursionError: a pickle nested too deeply
    NotImplementedError,  # a compression method zipfile lacks
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    zlib.error,
)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only `_ALLOWED_GLOBALS` and storages, read from the archive as numpy arrays."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(np.dtype(_TORCH_STORAGE_DTYPES[name]))
        raise UnsafeCheckpointError(
            f"refusing to unpickle global '{module}.{name}' (only tensors, storages and plain "
            "containers are allowed; convert the file to safetensors if it is trusted)"
        )

    def persistent_load(self, pid):
        """torch's `('storage', storage type, key, location, element count)`."""
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and _is_index(pid[4])
        ):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            self._storages[key] = _read_storage(self._archive, name, storage_type.dtype, numel)
        return self._storages[key]


def _read_storage(archive: zipfile.ZipFile, name: str, dtype: np.dtype, numel: int) -> np.ndarray:
    """A storage's entry as a read-only array, after checking that it exists and that its declared
    size is the `numel` elements the pickle asks for (torch writes exactly that), before reading."""
    try:
        declared = archive.getinfo(name).file_size
    except KeyError:
        raise ValueError(f"the archive has no entry {name!r} for a pickled storage") from None
    if declared != numel * dtype.itemsize:
        raise ValueError(
            f"entry {name!r} declares {declared} bytes, but the pickle's storage is {numel} "
            f"elements of {dtype} ({numel * dtype.itemsize} bytes)"
        )
    return np.frombuffer(archive.read(name), dtype=dtype)


def _check_archive(archive: zipfile.ZipFile, file_size: int) -> None:
    """Before anything is read: every entry lies inside the file, and the entries together declare
    at most `_MAX_COMPRESSION_RATIO` times the file's size (zip bombs). zipfile never returns more
    than an entry declares, so this bounds every read."""
    for info in archive.infolist():
        if not 0 <= info.header_offset <= info.header_offset + info.compress_size <= file_size:
            raise ValueError(f"zip entry {info.filename!r} lies outside the {file_size}-byte file")
    declared = sum(info.file_size for info in archive.infolist())
    if declared > _MAX_COMPRESSION_RATIO * file_size:
        raise ValueError(
            f"the zip entries declare {declared} bytes, more than {_MAX_COMPRESSION_RATIO} times "
            f"the file's {file_size} bytes (a zip bomb? torch.save stores entries uncompressed)"
        )


def _load_archive(archive: zipfile.ZipFile, file_size: int) -> Any:
    """Unpickles the archive's `data.pkl` with its storages (errors name no file)."""
    _check_archive(archive, file_size)
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
        raise ValueError(f"expected one data.pkl in the archive, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise ValueError("big-endian checkpoints are not supported")
    data = archive.read(pickles[0])
    _check_pickle(data, pickles[0])
    return _RestrictedUnpickler(io.BytesIO(data), archive, prefix).load()


def _check_pickle(data: bytes, name: str) -> None:
    """Parses the pickle's opcodes without running them, so that lengths (bytes, strings) past its
    end and memo indices beyond its size are refused before the unpickler allocates for them (for
    a 9-byte pickle ending in `LONG_BINPUT 2**26`, CPython's unpickler allocates a 1 GB memo).
    Memo indices count up from 0, each stored by an opcode of at least 2 bytes, so in a pickle
    that a pickler wrote they stay below its size."""
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg >= len(data):
                raise ValueError(f"memo index {arg} is beyond the pickle's {len(data)} bytes")
    except ValueError as error:
        raise ValueError(f"malformed pickle {name}: {error}") from None


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Loads a `torch.save` zip checkpoint (local or gs://) as nested dicts of numpy arrays, without torch.

    Raises `UnsafeCheckpointError` if the pickle needs anything but tensors and containers, and
    `ValueError` if the file is malformed (both name the file).
    """
    source = os.fspath(path)
    try:
        with storage_lib.path(source).open("rb") as f:
            size = _size(f)
            if not zipfile.is_zipfile(f):
                raise ValueError(
                    "not a zip-format torch checkpoint (files from torch < 1.6 are not supported; "
                    "re-save with a current torch or convert to safetensors)"
                )
            with zipfile.ZipFile(f) as archive:
                return _load_archive(archive, size)
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(f"{source}: {_one_line(error)}") from None
    except _MALFORMED_ERRORS as error:
        if not isinstance(error, ValueError):
            error = f"malformed checkpoint ({type(error).__name__}: {error})"
        raise ValueError(f"{source}: {_one_line(error)}") from None


def load_state_dict(path: str | os.PathLike) -> Any:
    """Loads weights from `.safetensors` or a torch zip checkpoint (`.pt`, `.pth`, `.bin`, `.ckpt`),
    local or gs://."""
    path = os.fspath(path)
    if not storage_lib.path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    return load_torch_checkpoint(path)


# ----------------------------------------------------------------------------- key checks


def check_state_dict(
    state_dict: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    source: str = "checkpoint",
) -> None:
    """Raises one `CheckpointMismatchError` listing all missing, unexpected and misshaped keys."""
    missing = sorted(set(expected_shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected_shapes))
    misshaped = sorted(
        f"{k}: expected {tuple(expected_shapes[k])}, got {tuple(np.shape(state_dict[k]))}"
        for k in set(expected_shapes) & set(state_dict)
        if tuple(np.shape(state_dict[k])) != tuple(expected_shapes[k])
    )
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the model:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", misshaped),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        raise CheckpointMismatchError("\n".join(lines))
