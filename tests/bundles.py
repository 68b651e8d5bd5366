"""Model bundles for tests. Random weights, for tests that need a model's files (a notebook, a
documented command), not a trained model: the layout `ldm-jax train` exports, written without
compiling anything (an init or an export compiles for tens of seconds on a busy 2-core machine).
And `train_and_export`: a config's task trained briefly in-process on one device."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import pipeline
from ldm_jax.diffusion import objectives
from ldm_jax.inference import generation
from ldm_jax.models import serialization
from ldm_jax.models import backbones
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.parallel.mesh import make_mesh
from ldm_jax.training import optimizers, steps, tasks
from ldm_jax.training.state import init_sharded_state


def random_params(module, *inputs, seed=0):
    """float32 params with the module's tree (std 0.05: outputs of order 1), from `jax.eval_shape`."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def save_dit(path, model_config):
    """A bundle of the DiT a config's `model` section describes (backbones.backbone_from_config); returns path."""
    model = backbones.backbone_from_config(model_config)
    x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels))
    serialization.save_model(path, model, random_params(model, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))
    return path


def save_vae(path, model_config, image_size):
    """A bundle of the AutoencoderKL an autoencoder config's `model` section describes; returns path."""
    vae = AutoencoderKL(**model_config)
    serialization.save_model(path, vae, random_params(vae, jnp.zeros((1, image_size, image_size, vae.in_channels))))
    return path


def train_and_export(config, path):
    """Trains `config` for config.train.num_steps steps on one device (the train loop's step, without
    its checkpoints and logs) and exports the EMA model to `path`; returns (task, final state)."""
    task = tasks.make_task(config)
    tx = optimizers.make_optimizer(config.optimizer)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    state, _ = init_sharded_state(task.init_params, tx, jax.random.PRNGKey(config.seed), mesh)
    data = pipeline.make_pipeline(config.data, pipeline.batch_sharding(mesh), text=config.get("text"))
    step = jax.jit(functools.partial(steps.train_step, loss_fn=task.loss_fn, tx=tx,
                                     learning_rate=optimizers.learning_rate_schedule(config.optimizer),
                                     ema_decay=config.ema.decay, ema_warmup=config.ema.warmup), donate_argnums=0)
    for _ in range(config.train.num_steps):
        state, metrics = step(state, task.frozen, next(data))
    assert float(metrics["finite"]) == 1.0
    task.export(str(path), state.ema_params)
    return task, state


def task_generator(config, task, decoder=generation.LatentDecoder()):
    """The `generation.Generator` a diffusion task's previews use, from config.sample."""
    objective = task.loss_fn.keywords["objective"]
    return generation.Generator.from_config(config.sample, task.model, objective.schedule,
                                            objectives.sampler_from_config(config.sample, objective), decoder,
                                            task.loss_fn.keywords["image_task"])
