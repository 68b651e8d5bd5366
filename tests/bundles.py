"""Model bundles with random weights, for tests that need a model's files (a notebook, a documented
command), not a trained model: the layout `ldm-jax train` exports, written without compiling
anything (an init or an export compiles for tens of seconds on a busy 2-core machine)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import serialization
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.training import tasks


def random_params(module, *inputs, seed=0):
    """float32 params with the module's tree (std 0.05: outputs of order 1), from `jax.eval_shape`."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def save_dit(path, model_config):
    """A bundle of the DiT a config's `model` section describes (tasks.dit_from_config); returns path."""
    model = tasks.dit_from_config(model_config)
    x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels))
    serialization.save_model(path, model, random_params(model, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))
    return path


def save_vae(path, model_config, image_size):
    """A bundle of the AutoencoderKL an autoencoder config's `model` section describes; returns path."""
    vae = AutoencoderKL(**model_config)
    serialization.save_model(path, vae, random_params(vae, jnp.zeros((1, image_size, image_size, vae.in_channels))))
    return path
