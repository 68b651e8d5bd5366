"""The two tasks the loop trains: losses fall on the bundled digits; previews and exports work."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.config import default_config
from ldm_jax.data import pipeline
from ldm_jax.models import serialization
from ldm_jax.parallel.mesh import make_mesh
from ldm_jax.training import optimizers, steps, tasks
from ldm_jax.training.state import init_sharded_state


def _vae_config():
    config = default_config()
    config.task = "autoencoder"
    config.data.update(source="digits", image_size=16, batch_size=16, random_flip=False, num_threads=1)
    config.model = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    config.vae_loss.update(disc_start=5, discriminator=dict(ndf=8, n_layers=2, norm="group", norm_groups=4))
    config.optimizer.update(learning_rate=2e-3, b1=0.5, b2=0.9)
    return config


def _dit_config():
    config = default_config()
    config.data.update(source="digits", image_size=8, batch_size=16, random_flip=False, num_threads=1)
    config.model = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4,
                        num_classes=10, learn_sigma=True)
    config.optimizer.update(learning_rate=2e-3)
    config.sample.update(num_steps=5, grid_rows=10, grid_cols=2, guidance_scale=2.0)
    return config


def _train(config, num_steps, eval_metric):
    """Trains `num_steps` on digits on a data-parallel mesh; returns (before, after, state, task)."""
    task = tasks.make_task(config)
    tx = optimizers.make_optimizer(config.optimizer)
    mesh = make_mesh({"data": -1})
    state, shardings = init_sharded_state(task.init_params, tx, jax.random.PRNGKey(0), mesh)
    data = pipeline.make_pipeline(config.data, pipeline.batch_sharding(mesh))
    step = jax.jit(functools.partial(steps.train_step, loss_fn=task.loss_fn, tx=tx,
                                     learning_rate=optimizers.learning_rate_schedule(config.optimizer),
                                     ema_decay=0.9), donate_argnums=0)
    eval_batch = next(data)
    keys = jax.random.split(jax.random.key(7), 4)
    evaluate = jax.jit(lambda p: jnp.mean(jax.vmap(
        lambda k: task.loss_fn(p, task.frozen, eval_batch, k, 0)[1][eval_metric] if eval_metric else
        task.loss_fn(p, task.frozen, eval_batch, k, 0)[0])(keys)))
    before = float(evaluate(state.params))
    for _ in range(num_steps):
        state, metrics = step(state, task.frozen, next(data))
        assert float(metrics["finite"]) == 1.0
    return before, float(evaluate(state.params)), state, task


@pytest.mark.slow
def test_autoencoder_reconstruction_improves_and_exports(tmp_path):
    before, after, state, task = _train(_vae_config(), 30, "rec_loss")
    assert after < 0.7 * before, (before, after)
    grid = task.preview(state.params, task.frozen, jax.random.key(0))
    assert grid.dtype == np.uint8 and grid.shape == (8 * 16, 8 * 16, 3)
    task.export(str(tmp_path / "vae"), state.params)
    vae, params, metadata = serialization.load_model(tmp_path / "vae")
    assert metadata == {"task": "autoencoder"} and 0.0 < vae.scaling_factor != 0.18215
    assert set(params) == set(state.params["autoencoder"])


@pytest.mark.slow
def test_diffusion_loss_falls_and_previews(tmp_path):
    before, after, state, task = _train(_dit_config(), 40, None)
    assert after < 0.8 * before, (before, after)
    grid = task.preview(state.ema_params, task.frozen, jax.random.key(0))
    assert grid.dtype == np.uint8 and grid.shape == (10 * 8, 2 * 8, 3)


@pytest.mark.parametrize(
    "update, message",
    [
        (lambda c: c.model.update(depthh=3), r"model: unknown field\(s\) \['depthh'\]"),
        (lambda c: c.update(task="gan"), "task='gan'"),
    ],
)
def test_bad_task_config(update, message):
    config = _dit_config()
    update(config)
    with pytest.raises(ValueError, match=message):
        tasks.make_task(config)


def test_autoencoder_rejects_batchnorm_discriminator_and_bad_size():
    config = _vae_config()
    config.vae_loss.discriminator.norm = "batch"
    with pytest.raises(ValueError, match="norm='batch'"):
        tasks.make_task(config)
    config = _vae_config()
    config.data.image_size = 17
    with pytest.raises(ValueError, match="data.image_size=17"):
        tasks.make_task(config)
