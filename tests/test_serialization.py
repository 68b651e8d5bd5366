"""Model bundles on disk: module config as JSON, params as orbax; what save_model may replace."""
import errno
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import serialization
from ldm_jax.models.vae import AutoencoderKL


@pytest.mark.slow
def test_bundle_round_trip_keeps_module_and_params(tmp_path):
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, dtype=jnp.bfloat16,
                        scaling_factor=0.5)
    params = jax.tree_util.tree_map(
        lambda x: np.asarray(x), serialization.nn.unbox(jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
    )
    serialization.save_model(tmp_path / "vae", vae, params, metadata={"note": "x"})
    assert not (tmp_path / "vae.tmp").exists()
    loaded, loaded_params, metadata = serialization.load_model(tmp_path / "vae")
    assert loaded == vae and metadata == {"note": "x"}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded_params, params)
    spec = json.loads((tmp_path / "vae" / "model.json").read_text())
    assert spec["class"] == "AutoencoderKL" and spec["config"]["dtype"] == {"dtype": "bfloat16"}


def test_missing_bundle_and_unknown_class(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model bundle"):
        serialization.load_model(tmp_path)
    with pytest.raises(ValueError, match="'UNet' is not known"):
        serialization.module_from_spec({"class": "UNet", "config": {}})


@pytest.fixture(scope="module")
def tiny_vae():
    """(module, params, other params) of a small VAE."""
    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4)
    params = serialization.nn.unbox(jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
    params = jax.tree_util.tree_map(np.asarray, params)
    return vae, params, jax.tree_util.tree_map(lambda x: x + 1, params)


def _assert_params(path, params):
    _, loaded, _ = serialization.load_model(path)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, params)


@pytest.mark.slow
def test_a_folder_of_other_files_is_refused_and_kept(tmp_path, monkeypatch, tiny_vae):
    vae, params, _ = tiny_vae
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("years of work")
    (folder / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match=re.escape(f"{folder} is neither empty nor a model bundle "
                                                   "(it holds sub/, thesis.txt)")):
        serialization.save_model(folder, vae, params)
    monkeypatch.chdir(folder)  # --out=.
    with pytest.raises(ValueError, match="neither empty nor a model bundle"):
        serialization.save_model(".", vae, params)
    (folder / "model.json").write_text("{}")  # a bundle's files beside others: still not a bundle
    (folder / "params").mkdir()
    with pytest.raises(ValueError, match="neither empty nor a model bundle"):
        serialization.save_model(folder, vae, params, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "years of work" and (folder / "sub" / "data.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_a_bundle_is_replaced_only_with_overwrite(tmp_path, tiny_vae):
    vae, first, second = tiny_vae
    serialization.save_model(tmp_path / "vae", vae, first)
    with pytest.raises(ValueError, match="holds a model bundle already; pass --overwrite"):
        serialization.save_model(tmp_path / "vae", vae, second)
    _assert_params(tmp_path / "vae", first)
    serialization.save_model(tmp_path / "vae", vae, second, overwrite=True)
    _assert_params(tmp_path / "vae", second)
    (tmp_path / "empty").mkdir()
    serialization.save_model(tmp_path / "empty", vae, first)
    _assert_params(tmp_path / "empty", first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "vae"]  # no temporaries, no old bundle


def test_only_stale_temporaries_of_bundles_are_removed(tmp_path, tiny_vae):
    (tmp_path / "vae.tmp" / "params").mkdir(parents=True)  # the old name, killed after its params
    (tmp_path / "vae.tmp" / "model.json").write_text("{}")
    (tmp_path / "vae.tmp-0123abcd" / "params.orbax-checkpoint-tmp-17").mkdir(parents=True)  # killed in orbax
    (tmp_path / "vae.tmp-mine").mkdir()
    (tmp_path / "vae.tmp-mine" / "notes.txt").write_text("not a bundle's")
    serialization.save_model(tmp_path / "vae", *tiny_vae[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae", "vae.tmp-mine"]


@pytest.mark.parametrize("target, message", [
    ("file", "is a file, not a directory"),
    ("file/bundle", "file is not a directory"),
])
def test_targets_that_cannot_hold_a_bundle(tmp_path, target, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=message):
        serialization.check_target(tmp_path / target)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError("RESOURCE_EXHAUSTED: Error writing \"w/0\" in OCDBT database: Failed to write 6815 bytes to file "
               "14: No space left on device [os_error_code='28']"),  # tensorstore's, from orbax
])
def test_a_full_disk_is_one_error_and_leaves_the_old_bundle(tmp_path, monkeypatch, tiny_vae, error):
    vae, first, second = tiny_vae
    serialization.save_model(tmp_path / "vae", vae, first)

    def full_disk(self, directory, *args, **kwargs):
        (directory.parent / "params.orbax-checkpoint-tmp").mkdir()  # part-written
        raise error

    monkeypatch.setattr(serialization.ocp.Checkpointer, "save", full_disk)
    with pytest.raises(OSError, match=re.escape(f"disk full: '{tmp_path / 'vae'}'")) as raised:
        serialization.save_model(tmp_path / "vae", vae, second, overwrite=True)
    assert raised.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
    _assert_params(tmp_path / "vae", first)


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch, tiny_vae):
    no_room = serialization.shutil.disk_usage(tmp_path)._replace(free=0)
    monkeypatch.setattr(serialization.shutil, "disk_usage", lambda _: no_room)
    with pytest.raises(OSError, match=r"disk full \(0.0 MiB free, the params need 0.0 MiB\)") as raised:
        serialization.save_model(tmp_path / "vae", *tiny_vae[:2])
    assert raised.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())
