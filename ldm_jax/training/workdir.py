"""A workdir belongs to one run: one writer at a time, and a restart must be the same run.

* `RunLock(workdir)`: `<workdir>/run.lock` (host, pid, token, heartbeat), taken by process 0 for the
  whole run and removed on exit. A second run is refused naming the holder. A lock is stale, and taken
  over, when its process is gone from this host or its heartbeat is older than `STALE_AFTER_S`
  (a preempted VM never removes its lock).
* `config_differences(saved, current)`: the fields of a checkpoint's config that a restart changed
  and that change the state or the maths (anything but `RESUMABLE_FIELDS`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Mapping

from ldm_jax import storage
from ldm_jax.config import default_config

# Fields a restart may change: how long to train and how often to log/save/preview, the device
# layout (checkpoints reshard onto any mesh), input-reading speed, sampling/evaluation settings, and
# what a non-finite step does ("train.nonfinite" also covers nonfinite_max: a saved state is finite and
# the same under every policy).
RESUMABLE_FIELDS = (
    "train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.keep_every", "train.preview_every", "train.profile_steps", "train.peak_tflops_per_device",
    "train.force_new", "train.nonfinite", "mesh.", "distributed.", "data.num_threads", "data.prefetch_batches",
    "sample.", "evaluate.",
)
_ABSENT = "<unset>"
LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
SETTLE_S = 2.0  # object store: how long a new lock waits before checking it is still its own


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`["model.depth: 2 -> 3", ...]` for every field whose value differs and that is not resumable.

    Both are plain dicts (a checkpoint's JSON, `ConfigDict.to_dict()`). A field set on one side only
    differs unless the other side's value is its default (a field added to `default_config()` since
    the checkpoint was written does not make it another run).
    """
    normalise = lambda tree: _flatten(json.loads(json.dumps(tree, default=str)))  # noqa: E731 - tuples -> lists
    old, new, defaults = normalise(saved), normalise(current), normalise(default_config().to_dict())
    differences = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name, defaults.get(name, _ABSENT)), new.get(name, defaults.get(name, _ABSENT))
        if before != after and not name.startswith(RESUMABLE_FIELDS):
            differences.append(f"{name}: {before!r} -> {after!r}")
    return differences


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """`with RunLock(workdir):` the run owns the workdir (a local path or a `gs://` URI); ValueError if
    a live run holds it.

    Locally the lock file is created exclusively (O_EXCL). An object store has no exclusive create
    through epath: the lock holds a token of its own, is written, and read back `SETTLE_S` later;
    of runs that start at once the last writer keeps the lock and the others are refused.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = storage.path(workdir) / LOCK_NAME
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}

    def _holder(self) -> dict | None:
        """The current lock's contents, or None when there is no lock or it is stale."""
        try:
            holder = json.loads(self.path.read_text())
            age = time.time() - float(holder["heartbeat"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):  # torn or foreign: judge by its age alone
            holder, age = {"host": "?", "pid": -1}, time.time() - self.path.stat().mtime
        gone = holder.get("host") == self._owner["host"] and not _pid_alive(int(holder.get("pid", -1)))
        if gone or age > STALE_AFTER_S:
            logging.warning("taking over the stale lock %s (%s)", self.path, holder)
            return None
        return holder

    def _mine(self) -> bool:
        """Whether the lock on storage is this one's (holds its token)."""
        try:
            return json.loads(self.path.read_text()).get("token") == self._owner["token"]
        except (OSError, ValueError, AttributeError):
            return False

    def _write(self, create: bool) -> None:
        """Writes the lock with a fresh heartbeat: created exclusively (`create`, locally) or replaced."""
        text = json.dumps(self._owner | {"heartbeat": time.time()})
        if storage.is_remote(self.path):
            self.path.write_text(text)  # one object upload: readers see the old lock or this one
            return
        flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if create else os.O_TRUNC)
        with os.fdopen(os.open(self.path, flags, 0o644), "w") as f:
            f.write(text)

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = self._holder()
        if holder is not None:
            raise ValueError(
                f"workdir {self.path.parent} is in use by another run (host {holder.get('host')}, "
                f"pid {holder.get('pid')}, per {self.path}); wait for it, or remove the lock if that run is gone"
            )
        if self.path.exists():
            self.path.unlink()
        taken = ValueError(f"workdir {self.path.parent} was just taken by another run ({self.path})")
        try:
            self._write(create=True)
        except FileExistsError:  # another run took it between the check and now
            raise taken
        if storage.is_remote(self.path):
            time.sleep(SETTLE_S)
            if not self._mine():  # another run wrote the lock after this one: it is theirs
                raise taken
        self._heartbeat = threading.Thread(target=self._beat, name="ldm_jax-run-lock", daemon=True)
        self._heartbeat.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write(create=False)
            except OSError as error:
                logging.warning("could not refresh the run lock %s: %s", self.path, error)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._heartbeat.join()
        if self._mine():
            self.path.unlink()
