"""orbax checkpoints: exact round trip with the data iterator, unusable steps set aside, disk full, resharding."""
import errno
import logging
import os
import subprocess

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ldm_jax.parallel.mesh import make_mesh
from ldm_jax.training import optimizers
from ldm_jax.training.checkpointing import Checkpointer, UnreadableCheckpointsError, abstract_like
from ldm_jax.training.state import apply_gradients, init_train_state
from sections import section


def _state(seed=0):
    params = {"w": jax.random.normal(jax.random.key(seed), (8, 4)), "b": jnp.zeros(4)}
    tx = optimizers.make_optimizer(section("optimizer", learning_rate=0.01))
    state = init_train_state(params, tx, jax.random.PRNGKey(seed))
    return apply_gradients(state, jax.tree_util.tree_map(jnp.ones_like, params), tx, jnp.float32(0.5))


def _iterator():
    return grain.MapDataset.range(100).seed(3).shuffle().batch(4).to_iter_dataset().__iter__()


def _assert_trees_equal(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_with_iterator_and_config(tmp_path):
    state, iterator = _state(), _iterator()
    for _ in range(3):
        next(iterator)
    checkpointer = Checkpointer(tmp_path / "ckpt", save_every=1)
    assert checkpointer.save(5, state, iterator, config={"model": {"depth": 2}})
    checkpointer.wait()
    expected_next = [next(iterator) for _ in range(2)]

    fresh_iterator = _iterator()
    restored, step = Checkpointer(tmp_path / "ckpt").restore(abstract_like(_state(seed=1)), fresh_iterator)
    assert step == 5
    _assert_trees_equal(restored, state)
    for batch in expected_next:
        np.testing.assert_array_equal(next(fresh_iterator), batch)
    assert checkpointer.restore_config(5) == {"model": {"depth": 2}}
    checkpointer.close()


def _truncate_files(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(0)


def test_torn_latest_step_is_moved_aside_and_saved_anew(tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path, save_every=1, async_save=False)
    checkpointer.save(1, _state(1))
    checkpointer.save(2, _state(2))
    checkpointer.wait()
    _truncate_files(tmp_path / "2" / "state")  # a step whose files were cut short
    resumed = Checkpointer(tmp_path, save_every=1, async_save=False)
    with caplog.at_level(logging.WARNING):
        restored, step = resumed.restore(abstract_like(_state()))
    assert step == 1
    _assert_trees_equal(restored, _state(1))
    assert "step 2" in caplog.text
    assert (tmp_path / "2.corrupt" / "state").is_dir() and not (tmp_path / "2").exists()
    # The resumed run reaches step 2 again and can save it (it used to die on StepAlreadyExistsError).
    assert resumed.save(2, _state(3), force=True)
    resumed.close()
    _assert_trees_equal(Checkpointer(tmp_path).restore(abstract_like(_state()))[0], _state(3))
    assert Checkpointer(tmp_path / "empty").restore(abstract_like(_state())) is None


def test_a_non_finite_step_is_set_aside_with_its_iterator_state(tmp_path):
    iterator = _iterator()
    checkpointer = Checkpointer(tmp_path, save_every=1, async_save=False)
    checkpointer.save(1, _state(1), iterator)
    expected_next = next(iterator)
    next(iterator)
    bad = _state(2)  # readable, iterator included, but its parameters hold a NaN
    checkpointer.save(2, bad.replace(params={"w": bad.params["w"].at[0, 0].set(jnp.nan), "b": bad.params["b"]}), iterator)
    checkpointer.close()
    fresh_iterator = _iterator()
    restored, step = Checkpointer(tmp_path).restore(abstract_like(_state()), fresh_iterator)
    assert step == 1 and (tmp_path / "2.corrupt").is_dir()
    _assert_trees_equal(restored, _state(1))
    np.testing.assert_array_equal(next(fresh_iterator), expected_next)


def test_all_steps_unusable_is_refused_and_nothing_changed(tmp_path):
    iterator = _iterator()
    checkpointer = Checkpointer(tmp_path, save_every=1, async_save=False)
    next(iterator)
    checkpointer.save(1, _state(1), iterator)
    next(iterator)
    bad = _state(2)
    checkpointer.save(2, bad.replace(params={"w": bad.params["w"] * jnp.inf, "b": bad.params["b"]}), iterator)
    checkpointer.close()
    _truncate_files(tmp_path / "1" / "state" / "d")  # step 1: iterator readable, arrays not
    fresh_iterator = _iterator()
    with pytest.raises(UnreadableCheckpointsError, match=r"step 2: .*non-finite.*; step 1: .*force_new"):
        Checkpointer(tmp_path).restore(abstract_like(_state()), fresh_iterator)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    np.testing.assert_array_equal(next(fresh_iterator), next(_iterator()))  # not left at a corrupt step's position


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root can mount one; the machines this project runs tests on are root)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_disk_full_removes_the_partial_save_and_says_so(small_disk):
    checkpointer = Checkpointer(small_disk / "ckpt", save_every=1)
    checkpointer.save(1, {"w": jnp.zeros(8)})
    checkpointer.wait()
    big = {"w": jax.random.normal(jax.random.key(0), (300_000,))}  # 1.2 MB of incompressible floats
    with pytest.raises(OSError, match=r"disk full .* latest complete checkpoint is step 1") as error:
        checkpointer.save(2, big)
        checkpointer.close()
    assert error.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (small_disk / "ckpt").iterdir()) == ["1"]


def test_restore_onto_another_mesh(tmp_path):
    mesh8 = make_mesh({"data": 8})
    sharded = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh8, PartitionSpec("data")))
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(0, {"x": sharded})
    mesh2 = make_mesh({"data": 2, "fsdp": 4}, devices=jax.devices())
    target = {"x": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh2, PartitionSpec(None, "fsdp")))}
    restored, _ = checkpointer.restore(target)
    assert restored["x"].sharding.spec == PartitionSpec(None, "fsdp")
    np.testing.assert_array_equal(restored["x"], np.arange(32.0).reshape(8, 4))


def test_bad_options():
    with pytest.raises(ValueError, match="train.checkpoint_every=0"):
        Checkpointer("/tmp/unused", save_every=0)
