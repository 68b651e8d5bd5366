"""The jitted train step: same trajectory on every mesh layout, FSDP memory, accumulation, NaN guard."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import objectives
from ldm_jax.models.dit import DiT, dit_preset
from ldm_jax.parallel import partitioning
from ldm_jax.parallel.mesh import batch_sharding, make_mesh, replicated
from ldm_jax.training import optimizers, steps
from ldm_jax.training.state import init_sharded_state, init_train_state
from sections import section

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
            num_classes=10, class_dropout_prob=0.1, learn_sigma=True)
BATCH = 16


def _batches(n):
    rng = np.random.default_rng(0)
    return [
        {"latent": rng.standard_normal((BATCH, 8, 8, 4)).astype(np.float32),
         "label": rng.integers(0, 10, BATCH).astype(np.int32)}
        for _ in range(n)
    ]


def _run(mesh_sizes, num_steps, devices=None):
    model = DiT(**TINY)
    tx = optimizers.make_optimizer(section("optimizer", learning_rate=0.001, grad_clip_norm=1.0))
    mesh = make_mesh(mesh_sizes, devices)
    init = lambda key: model.init(key, jnp.zeros((1, 8, 8, 4)), jnp.zeros(1), jnp.zeros(1, jnp.int32))["params"]
    state, shardings = init_sharded_state(init, tx, jax.random.PRNGKey(0), mesh)
    loss_fn = functools.partial(steps.diffusion_loss_fn, model=model,
                                objective=objectives.objective_from_config(section("diffusion"), learn_sigma=True))
    step = jax.jit(
        functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx, learning_rate=optimizers.learning_rate_schedule(section("optimizer", learning_rate=0.001)),
                          ema_decay=0.99),
        in_shardings=(shardings, None, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )
    losses = []
    for batch in _batches(num_steps):
        batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
        state, metrics = step(state, None, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, shardings


@pytest.fixture(scope="module")
def single_device_run():
    return _run({"data": 1}, 20, devices=jax.devices()[:1])


@pytest.mark.parametrize(
    "mesh_sizes",
    [{"data": 8}, {"fsdp": 8}, {"data": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2}],
    ids=["data", "fsdp", "tensor", "mix"],
)
@pytest.mark.slow
def test_every_layout_matches_one_device(single_device_run, mesh_sizes):
    reference, ref_state, _ = single_device_run
    losses, state, shardings = _run(mesh_sizes, 20)
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    assert losses[-1] < losses[0]
    max_rel = jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(b))) + 1e-12)),
        state.params, ref_state.params,
    )
    assert max(jax.tree_util.tree_leaves(max_rel)) < 1e-4
    # Layouts are what the rules say: e.g. the MLP kernel is split over fsdp and tensor.
    spec = shardings.params["blocks_0"]["mlp"]["fc1"]["kernel"].spec
    mesh = shardings.params["blocks_0"]["mlp"]["fc1"]["kernel"].mesh
    expected = tuple(a if mesh.shape[a] > 1 else None for a in ("fsdp", "tensor"))
    assert tuple(s if s is None or mesh.shape[s] > 1 else None for s in spec) == expected
    assert state.params["blocks_0"]["mlp"]["fc1"]["kernel"].sharding == shardings.params["blocks_0"]["mlp"]["fc1"]["kernel"]


def test_fsdp_shards_parameters_and_optimizer_state():
    """DiT-B/2 under FSDP over 8: per-device params + optimizer bytes <= total / 8 + 5%."""
    model = dit_preset("DiT-B/2", input_size=32, num_classes=1000)
    tx = optimizers.make_optimizer(section("optimizer", learning_rate=0.0001))

    def boxed_state():
        params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)), jnp.zeros(1), jnp.zeros(1, jnp.int32))["params"]
        return init_train_state(params, tx, jax.random.PRNGKey(0))

    abstract = jax.eval_shape(boxed_state)
    shardings = partitioning.state_shardings(abstract, make_mesh({"fsdp": 8}))
    shapes = jax.tree_util.tree_leaves(partitioning.nn.unbox(abstract))
    total = sum(leaf.size * leaf.dtype.itemsize for leaf in shapes)
    per_device = sum(
        int(np.prod(sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
        for leaf, sharding in zip(shapes, jax.tree_util.tree_leaves(shardings))
    )
    assert total > 4 * 100e6  # params + EMA + 2 Adam moments of a ~130M-parameter model
    assert per_device <= total / 8 * 1.05


def test_gradient_accumulation_equals_full_batch():
    params = {"w": jnp.arange(6.0).reshape(3, 2)}
    batch = {"x": jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)), jnp.float32)}

    def loss_fn(p, frozen, b, key, step):
        out = b["x"] @ p["w"]
        return jnp.mean(out**2), {"out_mean": jnp.mean(out)}

    full_metrics, full_grads = steps.loss_and_grads(loss_fn, params, None, batch, jax.random.key(0), 1)
    acc_metrics, acc_grads = steps.loss_and_grads(loss_fn, params, None, batch, jax.random.key(0), 4)
    np.testing.assert_allclose(acc_grads["w"], full_grads["w"], rtol=1e-6)
    np.testing.assert_allclose(acc_metrics["loss"], full_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc_metrics["out_mean"], full_metrics["out_mean"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="accumulation_steps=3"):
        steps.loss_and_grads(loss_fn, params, None, batch, jax.random.key(0), 3)


def test_non_finite_step_leaves_state_untouched():
    tx = optimizers.make_optimizer(section("optimizer", learning_rate=0.1))
    state = init_train_state({"w": jnp.ones(3)}, tx, jax.random.PRNGKey(0))

    def loss_fn(p, frozen, b, key, step):
        return jnp.sum(p["w"] * b["x"]), {}

    step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx,
                                     learning_rate=optimizers.learning_rate_schedule(section("optimizer", learning_rate=0.1)),
                                     ema_decay=0.9))
    good, metrics = step(state, None, {"x": jnp.ones(3)})
    assert float(metrics["finite"]) == 1.0 and int(good.step) == 1
    bad, metrics = step(good, None, {"x": jnp.array([1.0, jnp.nan, 1.0])})
    assert float(metrics["finite"]) == 0.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, bad, good)


@pytest.mark.parametrize(
    "config, learn_sigma, message",
    [
        ({"prediction": "score"}, False, "diffusion.prediction='score'"),
        ({"prediction": "v"}, True, "learned sigma"),
    ],
)
def test_bad_objective_config(config, learn_sigma, message):
    with pytest.raises(ValueError, match=message):
        objectives.objective_from_config(section("diffusion", **config), learn_sigma)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "flow"])
@pytest.mark.slow
def test_objectives_train_a_denoiser(prediction):
    """Loss falls for each objective (a tiny DiT fitting a fixed batch)."""
    model = DiT(**dict(TINY, learn_sigma=False, class_dropout_prob=0.0))
    tx = optimizers.make_optimizer(section("optimizer", learning_rate=0.003))
    params = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 4)), jnp.zeros(1), jnp.zeros(1, jnp.int32))["params"]
    state = init_train_state(partitioning.nn.unbox(params), tx, jax.random.PRNGKey(1))
    loss_fn = functools.partial(steps.diffusion_loss_fn, model=model,
                                objective=objectives.objective_from_config(section("diffusion", prediction=prediction), learn_sigma=False))
    step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx,
                                     learning_rate=optimizers.learning_rate_schedule(section("optimizer", learning_rate=0.003)),
                                     ema_decay=0.9))
    batch = {k: jnp.asarray(v[:8]) for k, v in _batches(1)[0].items()}
    batch["latent"] = jnp.tanh(batch["latent"])  # bounded data
    keys = jax.random.split(jax.random.key(5), 16)
    eval_loss = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss_fn(p, None, batch, k, 0)[0])(keys)))
    before = float(eval_loss(state.params))
    for _ in range(60):
        state, metrics = step(state, None, batch)
    after = float(eval_loss(state.params))
    assert after < 0.92 * before, (before, after)
