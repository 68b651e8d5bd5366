"""Preemption on a pod: SIGTERM reaches ONE of 2 hosts (jax.distributed, CPU collectives); both agree on a
step (jax's preemption sync point), save it, and exit 0; the saved step is complete and equals a
straight run to it."""
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from subprocesses import ROOT, checkpoint_state, cpu_env, free_address, run_train, train_command

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this module out


def _saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_to_one_host_saves_the_same_step_on_every_host(tmp_path):
    steps = ["--config.train.num_steps=400", "--config.train.checkpoint_every=4"]
    workdir, address = tmp_path / "two", free_address()
    logs = [tmp_path / f"host{i}.log" for i in range(2)]
    hosts = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:  # a file, not a pipe: nobody reads the logs until the end
            hosts.append(subprocess.Popen(
                train_command(workdir, *steps), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out,
                env=cpu_env(4, LDM_JAX_COORDINATOR=address, LDM_JAX_NUM_PROCESSES="2", LDM_JAX_PROCESS_ID=str(i)),
            ))
    try:
        start = time.monotonic()
        while not (workdir / "checkpoints" / "4").exists():
            assert all(h.poll() is None for h in hosts), logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
            assert time.monotonic() - start < 600
            time.sleep(0.05)
        hosts[1].send_signal(signal.SIGTERM)  # host 1 only
        for host in hosts:
            host.wait(timeout=600)
    finally:
        for host in hosts:
            if host.poll() is None:
                host.kill()
    texts = [log.read_text() for log in logs]
    for host, text in zip(hosts, texts):
        assert host.returncode == 0, text[-3000:]
    agreed = [re.findall(r"every host saves a checkpoint at step (\d+)", text) for text in texts]
    assert len(agreed[0]) == len(agreed[1]) == 1 and agreed[0] == agreed[1], agreed
    step = int(agreed[0][0])
    assert 4 < step < 400 and _saved_steps(workdir)[-1] == step
    assert not (workdir / "model").exists()  # no export of an unfinished run
    # The agreed step is complete, restorable, and what a straight (1-host) run to it gives.
    run_train(tmp_path / "one", f"--config.train.num_steps={step}", "--config.train.checkpoint_every=4")
    one, two = checkpoint_state(tmp_path / "one", step), checkpoint_state(workdir, step)
    assert int(two["step"]) == step
    for x, y in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
