"""The torch-free checkpoint reader: exact tensors, refuses code, reports key mismatches, and
refuses malformed or malicious files (out-of-bounds views, zip and pickle bombs, broken headers)
with one ValueError line naming the file."""
import io
import json
import os
import pickle
import re
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ldm_jax.convert import torch_io


def test_reads_torch_checkpoint_exactly(fixtures_dir):
    checkpoint = torch_io.load_state_dict(fixtures_dir / "torch_io_checkpoint.pt")
    expected = np.load(fixtures_dir / "torch_io_expected.npz")
    model = checkpoint["model"]
    assert sorted(model) == sorted(expected.files)
    for name in expected.files:
        got = model[name]
        if name == "bf16":
            assert got.dtype == ml_dtypes.bfloat16
            got = got.astype(np.float32)
        assert got.shape == expected[name].shape, name
        assert got.dtype == expected[name].dtype, name
        np.testing.assert_array_equal(got, expected[name], err_msg=name)
    np.testing.assert_array_equal(checkpoint["ema"]["w"], expected["f32"] * 2)
    assert checkpoint["args"].model == "DiT-XL/2" and checkpoint["step"] == 12


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _assert_refused(path, what, error=ValueError):
    """Loading `path` raises `error` (a ValueError) in one line that starts with the file's name
    and matches the regex `what`."""
    with pytest.raises(error) as raised:
        torch_io.load_state_dict(path)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert re.search(what, message), message


def test_refuses_code_execution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    _zip_with_pickle(path, pickle.dumps({"w": _RunsCode()}))
    unsafe = torch_io.UnsafeCheckpointError
    _assert_refused(path, "refusing to unpickle global '(posix|nt).system'", unsafe)
    assert not (tmp_path / "pwned").exists()


def test_rejects_non_zip_and_missing(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"w": 1}))
    _assert_refused(legacy, "not a zip-format torch checkpoint")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        torch_io.load_state_dict(tmp_path / "nope.pt")


# ----------------------------------------------------------------------------- hand-built .pt files


def _pushes(obj) -> bytes:
    """The opcodes that push `obj`: its protocol-2 pickle without the PROTO header and STOP."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _storage_pickle(numel: int) -> bytes:
    """Pushes torch.save's persistent id of float storage "0" with `numel` elements."""
    pid = _pushes("storage") + _global("torch", "FloatStorage") + _pushes("0") + _pushes("cpu")
    return pickle.MARK + pid + _pushes(numel) + pickle.TUPLE + pickle.BINPERSID


def _checkpoint_pickle(storage: bytes, storage_offset, size, stride) -> bytes:
    """`data.pkl` as torch.save writes `{"w": tensor}`, the tensor being
    `_rebuild_tensor_v2(storage, storage_offset, size, stride, False, OrderedDict())`."""
    view = b"".join(_pushes(v) for v in (storage_offset, size, stride, False))
    hooks = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    arguments = pickle.MARK + storage + view + hooks + pickle.TUPLE
    tensor = _global("torch._utils", "_rebuild_tensor_v2") + arguments + pickle.REDUCE
    w = _pushes("w") + tensor + pickle.SETITEM
    return pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + w + pickle.STOP


def _write_checkpoint(path, data_pkl: bytes, storage=b"\0" * 16, compression=zipfile.ZIP_STORED):
    """A torch.save-style zip: `archive/data.pkl`, `archive/byteorder`, and `storage` (if not None)
    as `archive/data/0`."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        if storage is not None:
            archive.writestr("archive/data/0", storage)
    return path


def _view_checkpoint(path, storage_offset, size, stride):
    """A checkpoint whose tensor "w" is the view (offset, size, stride) of storage [0, 1, 2, 3]."""
    data_pkl = _checkpoint_pickle(_storage_pickle(4), storage_offset, size, stride)
    return _write_checkpoint(path, data_pkl, np.arange(4, dtype=np.float32).tobytes())


@pytest.mark.parametrize(
    "storage_offset, size, stride, expected",
    [
        (0, (2, 2), (2, 1), [[0, 1], [2, 3]]),
        (1, (2, 2), (1, 1), [[1, 2], [2, 3]]),  # overlapping (unfold-like)
        (3, (5,), (0,), [3, 3, 3, 3, 3]),  # expand: repeats one element
        (2, (1, 2), (2**40, 1), [[2, 3]]),  # a size-1 dimension never uses its stride
        (4, (0, 3), (3, 1), np.zeros((0, 3))),  # empty: reaches nothing, offset may be the end
        (3, (), (), np.float32(3)),
    ],
)
def test_reads_views_inside_the_storage(tmp_path, storage_offset, size, stride, expected):
    path = _view_checkpoint(tmp_path / "view.pt", storage_offset, size, stride)
    w = torch_io.load_state_dict(path)["w"]
    assert w.dtype == np.float32 and w.shape == np.shape(expected)
    np.testing.assert_array_equal(w, expected)


@pytest.mark.parametrize(
    "storage_offset, size, stride, what",
    [
        pytest.param(0, (2,), (2**40,), "reaches element 1099511627776 of a storage of 4 elements",
                     id="huge-stride"),
        pytest.param(3, (2,), (-1,), "expected non-negative integers", id="negative-stride"),
        pytest.param(0, (4096,), (1,), "reaches element 4095 of a storage", id="size-past-end"),
        pytest.param(4, (1,), (1,), "reaches element 4 of a storage of 4", id="offset-at-end"),
        pytest.param(2**62, (), (), "reaches element 4611686018427387904", id="scalar-past-end"),
        pytest.param(-1, (1,), (1,), "expected non-negative integers", id="negative-offset"),
        pytest.param(0, (2, 2), (1,), "one stride per dimension", id="stride-count"),
        pytest.param(0, (2**40,), (0,), "repeats its 4-element storage into 1099511627776",
                     id="expand-bomb"),
    ],
)
def test_refuses_views_outside_the_storage(tmp_path, storage_offset, size, stride, what):
    """Each used to crash the process (SIGSEGV), copy memory past the storage into the tensor or
    ask for terabytes; the view is now checked before numpy makes it."""
    _assert_refused(_view_checkpoint(tmp_path / "view.pt", storage_offset, size, stride), what)


def test_refuses_inconsistent_storage_entries(tmp_path):
    data_pkl = _checkpoint_pickle(_storage_pickle(4), 0, (4,), (1,))
    missing = _write_checkpoint(tmp_path / "missing.pt", data_pkl, storage=None)
    _assert_refused(missing, "no entry 'archive/data/0'")
    oversized = _write_checkpoint(tmp_path / "oversized.pt", data_pkl, storage=b"\0" * 64)
    _assert_refused(oversized, r"declares 64 bytes, .* 4 elements of float32 \(16 bytes\)")


def test_refuses_zip_bombs_before_reading(tmp_path):
    numel = 16 << 20  # 64 MiB of zeros, deflated to 64 KB: a real bomb, expanding 1000-fold
    data_pkl = _checkpoint_pickle(_storage_pickle(numel), 0, (1,), (1,))
    bomb = _write_checkpoint(tmp_path / "bomb.pt", data_pkl, bytes(4 * numel), zipfile.ZIP_DEFLATED)
    _assert_refused(bomb, f"declare {4 * numel + len(data_pkl) + 6} bytes, more than 10 times")

    declares_1gib = tmp_path / "declares_1gib.pt"
    with zipfile.ZipFile(declares_1gib, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", _checkpoint_pickle(_storage_pickle(4), 0, (4,), (1,)))
        archive.writestr("archive/data/0", b"\0" * 16)
        archive.getinfo("archive/data/0").file_size = 1 << 30  # in the central directory
    _assert_refused(declares_1gib, "more than 10 times")


def test_reads_deflated_checkpoints(fixtures_dir, tmp_path):
    """Compression is allowed up to the ratio limit: the fixture, re-zipped with deflate, loads."""
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(fixtures_dir / "torch_io_checkpoint.pt") as source:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for info in source.infolist():
                archive.writestr(info.filename, source.read(info))
    expected = np.load(fixtures_dir / "torch_io_expected.npz")
    np.testing.assert_array_equal(torch_io.load_state_dict(path)["model"]["f32"], expected["f32"])


_PROTO_2 = pickle.PROTO + b"\x02"
# LONG_BINPUT 2**32-1: CPython's unpickler would allocate a 64 GB memo for it.
_MEMO_BOMB = _PROTO_2 + pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2**32 - 1) + b"."
_NOT_A_STORAGE = (
    _PROTO_2
    + _global("torch._utils", "_rebuild_tensor_v2")
    + _pushes(("abc", 0, (1,), (1,)))
    + pickle.REDUCE
    + pickle.STOP
)


@pytest.mark.parametrize(
    "data_pkl, what",
    [
        pytest.param(_PROTO_2 + b"}q\x00X", "malformed pickle archive/data.pkl: not enough data",
                     id="truncated"),
        pytest.param(_MEMO_BOMB, "memo index 4294967295 is beyond the pickle's", id="memo-bomb"),
        pytest.param(_PROTO_2 + _pushes("x") + pickle.BINPERSID + pickle.STOP,
                     "unexpected persistent id 'x'", id="persistent-id"),
        pytest.param(_NOT_A_STORAGE, "storage is a str, not a storage", id="not-a-storage"),
    ],
)
def test_refuses_malformed_pickles(tmp_path, data_pkl, what):
    _assert_refused(_write_checkpoint(tmp_path / "bad.pt", data_pkl), what)


def test_refuses_corrupt_zip(tmp_path):
    path = _view_checkpoint(tmp_path / "corrupt.pt", 0, (4,), (1,))
    path.write_bytes(path.read_bytes().replace(b"PK\x01\x02", b"PK\x01\x00", 1))
    _assert_refused(path, r"malformed checkpoint \(BadZipFile: Bad magic number for central dir")


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
        "c": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    path = tmp_path / "w.safetensors"
    torch_io.save_safetensors(tensors, path, metadata={"format": "pt"})
    loaded = torch_io.load_state_dict(path)
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name], value)
    assert not list(tmp_path.glob("*.tmp"))


def test_safetensors_readable_by_reference_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}
    path = tmp_path / "w.safetensors"
    torch_io.save_safetensors(tensors, path)
    np.testing.assert_array_equal(safetensors_numpy.load_file(str(path))["x"], tensors["x"])
    buffer = io.BytesIO(safetensors_numpy.save(tensors))
    (tmp_path / "ref.safetensors").write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(torch_io.load_state_dict(tmp_path / "ref.safetensors")["x"], tensors["x"])


def _safetensors(header) -> bytes:
    """A safetensors file: 8-byte header length, `header` as JSON, then 4 bytes of data."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 4


def _one_tensor(**changes) -> bytes:
    """A safetensors file with one float32 tensor "w" of shape [1], its entry updated by `changes`
    (a value of None removes the key)."""
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], **changes}
    return _safetensors({"w": {k: v for k, v in entry.items() if v is not None}})


@pytest.mark.parametrize(
    "content, what",
    [
        pytest.param(b"", "0 bytes, too short for a header", id="empty"),
        pytest.param(b"\x02\x00", "2 bytes, too short for a header", id="2-bytes"),
        pytest.param(struct.pack("<Q", 2**63 - 1) + b"{}",
                     "header length 9223372036854775807 runs past the end", id="huge-header"),
        pytest.param(_safetensors([]), "header is a JSON list, not an object", id="list-header"),
        pytest.param(struct.pack("<Q", 1) + b"{", "header is not valid JSON", id="bad-json"),
        pytest.param(_safetensors({"w": 3}), "tensor 'w': expected an object with dtype",
                     id="entry-not-object"),
        pytest.param(_one_tensor(dtype=None), "tensor 'w': expected an object with dtype",
                     id="missing-dtype"),
        pytest.param(_one_tensor(dtype=["F32"]), r"unsupported dtype \['F32'\]", id="list-dtype"),
        pytest.param(_one_tensor(dtype="F8_E4M3"), "unsupported dtype 'F8_E4M3'", id="F8-dtype"),
        pytest.param(_one_tensor(shape=[-1]), r"shape \[-1\] is not a list of non-negative",
                     id="negative-shape"),
        pytest.param(_one_tensor(data_offsets=[0, 400]),
                     r"data_offsets \[0, 400\] are not .* within the 4 bytes", id="past-the-end"),
        pytest.param(_one_tensor(data_offsets=[4, 0]), r"data_offsets \[4, 0\] are not",
                     id="offsets-reversed"),
        pytest.param(_one_tensor(shape=[2, 2]),
                     r"shape \[2, 2\] of F32 needs 16 bytes, data_offsets \[0, 4\] hold 4",
                     id="shape-offsets-mismatch"),
    ],
)
def test_refuses_malformed_safetensors(tmp_path, content, what):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    _assert_refused(path, what)


def test_check_state_dict_lists_every_problem():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    got = {"a": np.zeros((3, 2)), "b": np.zeros(4), "extra": np.zeros(1)}
    with pytest.raises(torch_io.CheckpointMismatchError) as error:
        torch_io.check_state_dict(got, expected, source="w.pt")
    message = str(error.value)
    assert "w.pt" in message
    assert "missing keys (1)" in message and "    c" in message
    assert "unexpected keys (1)" in message and "    extra" in message
    assert "a: expected (2, 3), got (3, 2)" in message
    torch_io.check_state_dict({"b": np.zeros(4)}, {"b": (4,)})
