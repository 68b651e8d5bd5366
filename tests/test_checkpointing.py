"""orbax checkpoints: exact round trip with the data iterator, torn steps skipped, resharding."""
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ldm_jax.parallel.mesh import make_mesh
from ldm_jax.training import optimizers
from ldm_jax.training.checkpointing import Checkpointer, abstract_like
from ldm_jax.training.state import apply_gradients, init_train_state


def _state(seed=0):
    params = {"w": jax.random.normal(jax.random.key(seed), (8, 4)), "b": jnp.zeros(4)}
    tx = optimizers.make_optimizer({"learning_rate": 1e-2})
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


def test_torn_latest_step_falls_back_with_warning(tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path, save_every=1, async_save=False)
    checkpointer.save(1, _state(1))
    checkpointer.save(2, _state(2))
    checkpointer.wait()
    # Simulate a step whose files were cut short: truncate every file of step 2's state.
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(0)
    with caplog.at_level(logging.WARNING):
        restored, step = Checkpointer(tmp_path).restore(abstract_like(_state()))
    assert step == 1
    _assert_trees_equal(restored, _state(1))
    assert "step 2" in caplog.text
    assert Checkpointer(tmp_path / "empty").restore(abstract_like(_state())) is None


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
    with pytest.raises(ValueError, match="checkpoint.save_every"):
        Checkpointer("/tmp/unused", save_every=0)
