"""Exact resume of the training loop after kill -9, and saving on SIGTERM (real subprocesses)."""
import signal
import subprocess
import time

import pytest

from subprocesses import ROOT, assert_bitwise_equal, train_command, cpu_env, run_train, checkpoint_state, wait_for

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this module out


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    steps = ["--config.train.num_steps=40", "--config.train.checkpoint_every=8"]
    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(killed, *steps), cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for(killed / "checkpoints" / "8", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "checkpoints" / "40").exists(), "the run finished before it could be killed"
    run_train(killed, *steps)  # resumes from the newest checkpoint
    straight = tmp_path / "straight"
    run_train(straight, *steps)
    assert_bitwise_equal(checkpoint_state(killed, 40), checkpoint_state(straight, 40))


def test_sigterm_saves_before_exiting(tmp_path):
    steps = ["--config.train.num_steps=400", "--config.train.checkpoint_every=4"]
    process = subprocess.Popen(train_command(tmp_path, *steps), cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "checkpoints" / "4", process)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "SIGTERM received" in stderr
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 4 <= saved[-1] < 400
    assert not (tmp_path / "model").exists()  # no export of an unfinished run
