"""The torch-free checkpoint reader: exact tensors, refuses code, reports key mismatches."""
import io
import os
import pickle
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


def test_refuses_code_execution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    _zip_with_pickle(path, pickle.dumps({"w": _RunsCode()}))
    with pytest.raises(torch_io.UnsafeCheckpointError, match="system"):
        torch_io.load_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_rejects_non_zip_and_missing(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match="zip-format"):
        torch_io.load_state_dict(legacy)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        torch_io.load_state_dict(tmp_path / "nope.pt")


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
