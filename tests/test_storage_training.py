"""Training with a gs:// workdir, against a real GCS emulator (the `gcs` fixture): kill -9 and
resume bit-exact, the run lock, unusable steps set aside, unfinished saves removed, force_new.

clu's TensorBoard writer writes with `tf.io.gfile`, which cannot reach an emulator (its GCS URL is
fixed): these runs set LDM_JAX_TENSORBOARD=0 (metrics to the log only) and the writer's seam,
`loop.tensorboard_logdir`, is checked for the logdir it gives (the URI itself) instead.
"""
import json
import signal
import subprocess
import threading
import time
import uuid

import jax.numpy as jnp
import pytest

from ldm_jax import storage
from ldm_jax.models import serialization
from ldm_jax.training import checkpointing, loop, workdir
from subprocesses import ROOT, assert_bitwise_equal, cpu_env, run_train, train_command, wait_for
from test_checkpointing import _assert_trees_equal, _state
from test_loop import _tiny_config


@pytest.fixture
def run_uri(gcs):
    """A fresh gs:// folder for one test (the emulator's bucket lives for the whole session)."""
    yield gcs.uri(f"run-{uuid.uuid4().hex[:8]}")
    assert not (ROOT / "gs:").exists(), "a gs:// URI was written as a local folder"


def _steps(location):
    return sorted(int(p.name) for p in (storage.path(location) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_kill_9_then_resume_on_gcs_is_bit_identical(gcs, run_uri):
    env = cpu_env(1, **gcs.env, **{loop.TENSORBOARD_ENV: "0"})
    steps = ["--config.train.num_steps=40", "--config.train.checkpoint_every=8"]
    killed, straight = f"{run_uri}/killed", f"{run_uri}/straight"
    process = subprocess.Popen(train_command(killed, *steps), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    # orbax finalises a step on GCS by writing its commit_success.txt last (no renames there).
    wait_for(storage.path(killed) / "checkpoints" / "8" / "commit_success.txt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (storage.path(killed) / "model").exists(), "the run finished before it could be killed"
    assert (storage.path(killed) / workdir.LOCK_NAME).exists()  # a killed run leaves its lock: stale, taken over
    # Resumed with previews on (resumable fields: they change neither the state nor the data order).
    preview = ["--config.train.preview_every=40", "--config.sample.num_steps=2", "--config.sample.grid_rows=2",
               "--config.sample.grid_cols=2"]
    resumed = run_train(killed, *steps, *preview, env=env)
    assert "resumed from step" in resumed.stderr
    assert f"sample grids: {killed}/previews/step_00000040.png" in resumed.stdout
    assert (storage.path(killed) / "previews" / "step_00000040.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_train(straight, *steps, env=env)
    final = [serialization.read_tree(storage.path(run) / "checkpoints" / "40" / "state") for run in (killed, straight)]
    assert_bitwise_equal(*final)
    for run in (killed, straight):
        assert (storage.path(run) / "model" / "model.json").exists()
        assert not (storage.path(run) / workdir.LOCK_NAME).exists()


def test_tensorboard_logdir_is_the_workdir_uri(run_uri, monkeypatch, tmp_path):
    monkeypatch.delenv(loop.TENSORBOARD_ENV, raising=False)
    assert loop.tensorboard_logdir(run_uri) == run_uri
    monkeypatch.chdir(tmp_path)
    assert loop.tensorboard_logdir("relative") == str(tmp_path / "relative")
    monkeypatch.setenv(loop.TENSORBOARD_ENV, "0")
    assert loop.tensorboard_logdir(run_uri) is None


def test_run_lock_on_gcs(run_uri, caplog):
    lock = storage.path(run_uri) / workdir.LOCK_NAME
    with workdir.RunLock(run_uri):
        assert lock.exists()
        with pytest.raises(ValueError, match=r"in use by another run \(host .*, pid \d+"):
            with workdir.RunLock(run_uri):
                pass
    assert not lock.exists()  # released on exit
    lock.write_text('{"host": "other-vm", "pid": 1, "heartbeat": 0}')  # a preempted VM's lock
    with workdir.RunLock(run_uri):
        assert '"host": "other-vm"' not in lock.read_text()
    assert "taking over the stale lock" in caplog.text
    lock.write_text("{torn")  # unreadable: judged by the object's age (fresh, so held)
    with pytest.raises(ValueError, match=r"in use by another run \(host \?"):
        with workdir.RunLock(run_uri):
            pass


def test_a_gcs_lock_overwritten_while_it_settles_belongs_to_the_last_writer(run_uri):
    lock = storage.path(run_uri) / workdir.LOCK_NAME

    def overwrite():  # another host that also found no lock, writing just after this one
        while not lock.exists():
            time.sleep(0.01)
        lock.write_text(json.dumps({"host": "other-vm", "pid": 1, "token": "theirs", "heartbeat": time.time()}))

    other_host = threading.Thread(target=overwrite)
    other_host.start()
    with pytest.raises(ValueError, match="just taken by another run"):
        with workdir.RunLock(run_uri):
            pass
    other_host.join()
    assert json.loads(lock.read_text())["token"] == "theirs"  # the refused run removed nothing


def test_unusable_step_is_set_aside_on_gcs(run_uri):
    directory = f"{run_uri}/checkpoints"
    checkpointer = checkpointing.Checkpointer(directory, save_every=1, async_save=False)
    checkpointer.save(1, _state(1))
    checkpointer.save(2, _state(2))
    checkpointer.close()
    state_files = [p for p in (storage.path(directory) / "2" / "state").iterdir() if not p.is_dir()]
    for path in state_files:
        path.write_bytes(b"")  # a step whose files were cut short
    resumed = checkpointing.Checkpointer(directory, save_every=1, async_save=False)
    restored, step = resumed.restore(checkpointing.abstract_like(_state()))
    assert step == 1
    _assert_trees_equal(restored, _state(1))
    aside = storage.path(directory) / "2.corrupt"
    assert (aside / "commit_success.txt").exists() and not (storage.path(directory) / "2").exists()
    assert sorted(p.name for p in (aside / "state").iterdir()) == sorted(
        p.name for p in (storage.path(directory) / "1" / "state").iterdir())
    assert resumed.save(2, _state(3), force=True)  # the resumed run saves step 2 anew
    resumed.close()
    _assert_trees_equal(checkpointing.Checkpointer(directory).restore(checkpointing.abstract_like(_state()))[0], _state(3))


def test_remove_temporary_on_gcs_deletes_only_unfinished_steps(run_uri):
    directory = storage.path(run_uri) / "checkpoints"
    checkpointer = checkpointing.Checkpointer(directory, save_every=1, async_save=False)
    checkpointer.save(1, {"w": jnp.zeros(4)})
    (directory / "2" / "state" / "d" / "part").write_bytes(b"x")  # a save that never wrote commit_success.txt
    (directory / "2.corrupt" / "state" / "x").write_bytes(b"x")  # not a step: never touched
    assert checkpointer.remove_temporary() == ["2"]
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2.corrupt"]
    assert checkpointer.all_steps() == [1]
    checkpointer.close()


@pytest.mark.slow
def test_force_new_moves_the_old_run_aside_on_gcs(run_uri, monkeypatch):
    monkeypatch.setenv(loop.TENSORBOARD_ENV, "0")
    loop.train(_tiny_config(num_steps=1), run_uri)
    changed = _tiny_config(num_steps=1)
    changed.model.hidden_size = 64
    with pytest.raises(loop.OtherRunError, match="model.hidden_size: 32 -> 64"):
        loop.train(changed, run_uri)
    changed.train.force_new = True
    loop.train(changed, run_uri)
    assert _steps(run_uri) == [1]
    (old_run,) = storage.path(run_uri).glob("checkpoints.replaced-*")
    assert sorted(p.name for p in old_run.iterdir()) == ["1"]
    assert int(serialization.read_tree(old_run / "1" / "state")["step"]) == 1  # moved whole: still readable
