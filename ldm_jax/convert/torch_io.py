"""Reading and writing PyTorch weights safely, without torch.

Two formats are read into flat `{name: np.ndarray}` dicts:
- `.safetensors` (header JSON + raw little-endian buffers; bf16 through `ml_dtypes`);
- torch's zip checkpoints (`torch.save`, `.pt`/`.pth`/`.bin`) through a *restricted* unpickler that
  only knows how to rebuild tensors, storages and plain containers. Any other global in the pickle
  (the way a malicious checkpoint runs code) raises `UnsafeCheckpointError`: this is the same
  allow-list idea as `torch.load(..., weights_only=True)`, and it needs no torch at run time.

`check_state_dict` compares a loaded state dict with the keys and shapes a model expects and
raises one `CheckpointMismatchError` listing every missing, unexpected or wrongly shaped key.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np


class UnsafeCheckpointError(pickle.UnpicklingError):
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


# ----------------------------------------------------------------------------- safetensors


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file into `{name: array}` (copies, in the stored dtype)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = array.reshape(info["shape"]).copy()
    return tensors


def save_safetensors(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes `{name: array}` as `.safetensors` (atomically: temp file, then rename)."""
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
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for raw in buffers:
            f.write(raw)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- torch zip


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    if not size:
        return storage[storage_offset].copy()
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=tuple(size),
        strides=tuple(s * itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)


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


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._source = source
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(_TORCH_STORAGE_DTYPES[name])
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to unpickle global '{module}.{name}' (only tensors, "
            "storages and plain containers are allowed; convert the file to safetensors if it "
            "is trusted)"
        )

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id {pid!r}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
        return self._storages[key]


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Loads a `torch.save` zip checkpoint as nested dicts of numpy arrays, without torch.

    Raises `UnsafeCheckpointError` if the pickle needs anything but tensors and containers.
    """
    source = os.fspath(path)
    if not zipfile.is_zipfile(source):
        raise ValueError(
            f"{source}: not a zip-format torch checkpoint (files from torch < 1.6 are not "
            "supported; re-save with a current torch or convert to safetensors)"
        )
    with zipfile.ZipFile(source) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{source}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise ValueError(f"{source}: big-endian checkpoints are not supported")
        with archive.open(pickles[0]) as f:
            return _RestrictedUnpickler(f, archive, prefix, source).load()


def load_state_dict(path: str | os.PathLike) -> Any:
    """Loads weights from `.safetensors` or a torch zip checkpoint (`.pt`, `.pth`, `.bin`, `.ckpt`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
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
