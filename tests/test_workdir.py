"""A workdir belongs to one run: the lock on it, and which config changes make another run."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ldm_jax.config import default_config
from ldm_jax.training import workdir


def test_config_differences_name_what_changes_the_run():
    saved = default_config().to_dict()
    current = default_config()
    current.model.hidden_size = 64
    current.diffusion.prediction = "v"
    current.data.batch_size = 32
    current.train.num_steps = 10  # resumable: train longer
    current.mesh.data = 2  # resumable: checkpoints reshard
    current.sample.guidance_scale = 4.0  # resumable: previews only
    assert workdir.config_differences(saved, current.to_dict()) == [
        "data.batch_size: 64 -> 32", "diffusion.prediction: 'epsilon' -> 'v'", "model.hidden_size: '<unset>' -> 64",
    ]
    assert workdir.config_differences(saved, default_config().to_dict()) == []
    # A field added to the defaults since the checkpoint was written is not a difference at its default.
    del saved["diffusion"]["time_shift"]
    assert workdir.config_differences(saved, default_config().to_dict()) == []
    # A checkpoint's JSON holds lists where the config holds tuples: not a difference.
    assert workdir.config_differences(json.loads(json.dumps(saved)), default_config().to_dict()) == []


def _write_lock(path, **fields):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, workdir.LOCK_NAME), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()} | fields, f)


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=holder.pid)
        with pytest.raises(ValueError, match=rf"in use by another run \(host {socket.gethostname()}, pid {holder.pid}"):
            with workdir.RunLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with workdir.RunLock(tmp_path):  # its process is gone: the lock is stale and taken over
        with open(tmp_path / workdir.LOCK_NAME) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert not (tmp_path / workdir.LOCK_NAME).exists()  # released on exit


def test_a_lock_of_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    _write_lock(tmp_path, host="other-vm", pid=1)
    with pytest.raises(ValueError, match="other-vm"):
        with workdir.RunLock(tmp_path):
            pass
    _write_lock(tmp_path, host="other-vm", pid=1, heartbeat=time.time() - workdir.STALE_AFTER_S - 1)
    with workdir.RunLock(tmp_path):
        pass
