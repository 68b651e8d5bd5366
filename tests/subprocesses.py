"""Real subprocesses for the tests: `ldm-jax train` runs (killed, preempted, several hosts) and
Python scripts run as several jax.distributed hosts on localhost; the experiment configs as users
load them."""
import importlib.util
import os
import pathlib
import socket
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


def load_config_module(name):
    """The module configs/<name>.py, loaded from its path as `--config=configs/<name>.py` does."""
    spec = importlib.util.spec_from_file_location(f"configs.{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name, *args):
    """configs/<name>.py's get_config(*args)."""
    return load_config_module(name).get_config(*args)


def train_command(workdir, *overrides):
    return [sys.executable, "-m", "ldm_jax.cli", "train", f"--workdir={workdir}", *TINY, *overrides]


def cpu_env(num_devices=8, **extra):
    """The test session's environment (conftest.py: its XLA flags, compilation cache) with
    `num_devices` simulated CPU devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
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




def free_address() -> str:
    """A free 127.0.0.1:port for a jax.distributed coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def run_python_hosts(script, *args, num_processes=2, num_devices=2, timeout=300):
    """Runs `python -c script ADDRESS PROCESS_ID *args` as `num_processes` local hosts with
    `num_devices` CPU devices each; asserts every host exits 0; returns their outputs."""
    address = free_address()
    procs = [
        subprocess.Popen([sys.executable, "-c", script, address, str(i), *map(str, args)], env=cpu_env(num_devices),
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(num_processes)
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs
