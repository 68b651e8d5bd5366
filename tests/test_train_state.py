"""TrainState, EMA and optimizer construction."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax.training import optimizers
from ldm_jax.training.state import apply_gradients, ema_decay_at, ema_update, init_train_state
from sections import section


def test_apply_gradients_matches_optax_and_ema_formula():
    params = {"w": jnp.arange(4.0), "b": jnp.ones(())}
    tx = optimizers.make_optimizer(section("optimizer", name='adamw', learning_rate=0.1))
    state = init_train_state(params, tx, jax.random.PRNGKey(0))
    grads = {"w": jnp.array([1.0, -2.0, 0.5, 0.0]), "b": jnp.array(3.0)}
    new = apply_gradients(state, grads, tx, ema_decay=jnp.float32(0.9))

    updates, _ = optax.adamw(0.1, weight_decay=0.0).update(grads, optax.adamw(0.1, weight_decay=0.0).init(params), params)
    expected = optax.apply_updates(params, updates)
    for k in params:
        np.testing.assert_allclose(new.params[k], expected[k], rtol=1e-6)
        np.testing.assert_allclose(new.ema_params[k], 0.9 * params[k] + 0.1 * expected[k], rtol=1e-6)
    assert int(new.step) == 1
    # The state is a pytree of arrays only.
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(new))


def test_ema_decay_warmup():
    assert float(ema_decay_at(jnp.int32(0), 0.9999, warmup=True)) == pytest.approx(0.1)
    assert float(ema_decay_at(jnp.int32(10**7), 0.9999, warmup=True)) == pytest.approx(0.9999)
    assert float(ema_decay_at(jnp.int32(0), 0.9999, warmup=False)) == pytest.approx(0.9999)
    tree = ema_update({"a": jnp.zeros(2)}, {"a": jnp.ones(2)}, jnp.float32(0.75))
    np.testing.assert_allclose(tree["a"], 0.25)


@pytest.mark.parametrize("decay", [2.0, -0.1, float("nan")])
def test_ema_decay_out_of_range_is_refused(decay):
    with pytest.raises(ValueError, match=r"ema.decay=.*must be in \[0, 1\]"):
        ema_decay_at(jnp.int32(0), decay, warmup=False)


def test_schedules():
    warm = optimizers.learning_rate_schedule(section("optimizer", learning_rate=1.0, warmup_steps=4))
    assert [float(warm(s)) for s in (0, 2, 4, 100)] == [0.0, 0.5, 1.0, 1.0]
    cosine = optimizers.learning_rate_schedule(
        section("optimizer", learning_rate=1.0, schedule="cosine", warmup_steps=2, total_steps=12))
    assert float(cosine(2)) == pytest.approx(1.0) and float(cosine(12)) == pytest.approx(0.0)
    assert float(cosine(7)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"name": "lion", "learning_rate": 1.0}, "optimizer.name='lion'"),
        ({"learning_rate": 1.0, "schedule": "step"}, "optimizer.schedule='step'"),
        ({"learning_rate": 1.0, "schedule": "cosine", "total_steps": 0}, "optimizer.total_steps"),
        ({"learning_rate": -1.0}, r"optimizer.learning_rate=-1.0: must be a finite number > 0"),
        ({"learning_rate": 0.0}, "optimizer.learning_rate=0.0"),
        ({"learning_rate": float("nan")}, "optimizer.learning_rate=nan"),
        ({"learning_rate": 1.0, "b2": 1.0}, r"optimizer.b2=1.0: must be a finite number in \[0.0, 1.0\)"),
        ({"learning_rate": 1.0, "weight_decay": -0.1}, "optimizer.weight_decay"),
        ({"learning_rate": 1.0, "grad_clip_norm": float("inf")}, "optimizer.grad_clip_norm"),
    ],
)
def test_bad_optimizer_config(config, message):
    with pytest.raises(ValueError, match=message):
        optimizers.make_optimizer(section("optimizer", **config))


def test_gradient_clipping():
    tx = optimizers.make_optimizer(section("optimizer", name='sgd', learning_rate=1.0, momentum=0.0, grad_clip_norm=1.0))
    params = {"w": jnp.zeros(2)}
    updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)
