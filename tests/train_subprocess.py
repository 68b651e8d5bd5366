"""Running `ldm-jax train` as real subprocesses (killed, preempted, several hosts) for the tests."""
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

from ldm_jax.models import serialization

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config=configs/dit_digits.py",
    "--config.data.image_size=8", "--config.data.batch_size=16", "--config.data.random_flip=True",
    "--config.model.input_size=8", "--config.model.hidden_size=32", "--config.model.depth=2",
    "--config.train.log_every=4", "--config.train.preview_every=0",
]


def train_command(workdir, *overrides):
    return [sys.executable, "-m", "ldm_jax.cli", "train", f"--workdir={workdir}", *TINY, *overrides]


def cpu_env(num_devices=8, **extra):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}", JAX_PLATFORMS="cpu")
    env.update(extra)
    return env


def run_train(workdir, *overrides, env=None):
    result = subprocess.run(train_command(workdir, *overrides), cwd=ROOT, env=env or cpu_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def checkpoint_state(workdir, step):
    return serialization.read_tree(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")


def assert_bitwise_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def wait_for(path, process, timeout=600):
    start = time.monotonic()
    while not path.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() - start < timeout
        time.sleep(0.01)


