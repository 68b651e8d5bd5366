"""The training loop over 2 local hosts (jax.distributed, CPU collectives) equals 1 host."""
import subprocess

import jax
import numpy as np
import pytest

from subprocesses import ROOT, free_address, train_command, cpu_env, run_train, checkpoint_state

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this module out


def test_two_hosts_match_one_host(tmp_path):
    steps = ["--config.train.num_steps=6", "--config.train.checkpoint_every=6"]
    run_train(tmp_path / "one", *steps)
    address = free_address()
    hosts = [
        subprocess.Popen(
            train_command(tmp_path / "two", *steps), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=cpu_env(4, LDM_JAX_COORDINATOR=address, LDM_JAX_NUM_PROCESSES="2", LDM_JAX_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    for host in hosts:
        _, stderr = host.communicate(timeout=900)
        assert host.returncode == 0, stderr[-3000:]
    one, two = checkpoint_state(tmp_path / "one", 6), checkpoint_state(tmp_path / "two", 6)
    for x, y in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
