"""Preemption (SIGTERM) as a decision every host takes at the same step: save there, then stop.

    with Preemption() as preemption:
        for step in ...:
            ...run the step...
            if preemption.reached(step):   # call it once at every step, on every host
                save(step); break

SIGTERM reaches the hosts of a pod at different steps, and a checkpoint save is collective: a host
that saved alone would wait forever for the others. How the hosts agree depends on the run:

* Several processes (`jax.distributed`) with JAX's preemption service (on by default,
  `jax_enable_preemption_service`): `multihost_utils.reached_preemption_sync_point(step)`. The
  coordination service's own SIGTERM handler notices the signal on any host, tells the others, and
  they agree in the background on the step after the largest step any host had reached; the call
  returns True at that step on every host, without a host sync of its own. Checked here with 2 CPU
  processes over gloo (tests/test_preemption.py). Its handler is the process's: a Python handler
  would replace it, so none is installed.
* Several processes without the service: a Python handler sets a local flag, and the hosts all-gather
  their flags at every step (a small blocking host sync per step); any host's flag stops all of them.
* One process (no `jax.distributed`, where the sync point always answers False): the Python handler's
  flag, read at the next step, as before.
"""
from __future__ import annotations

import logging
import signal

import jax
import numpy as np
from jax._src import distributed  # noqa: PLC2701 - whether the coordination service has a preemption manager
from jax.experimental import multihost_utils

SYNC_POINT, ALL_GATHER, LOCAL = "sync_point", "all_gather", "local"


def agreement() -> str:
    """How this process's hosts agree on a preemption step: SYNC_POINT, ALL_GATHER or LOCAL."""
    if jax.process_count() == 1:
        return LOCAL
    return SYNC_POINT if distributed.global_state.preemption_sync_manager is not None else ALL_GATHER


class Preemption:
    """`reached(step)`: True at the one step where every host saves and stops after SIGTERM."""

    def __init__(self):
        self.mode = agreement()
        self.requested = False  # this process's own SIGTERM (LOCAL and ALL_GATHER)
        self._previous = None

    def __enter__(self) -> "Preemption":
        if self.mode != SYNC_POINT:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):  # noqa: ARG002
        logging.warning("SIGTERM received: saving a checkpoint, then stopping")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.mode != SYNC_POINT:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        """Whether to save and stop at `step`; the same answer on every host. Call it at every step."""
        if self.mode == LOCAL:
            return self.requested
        if self.mode == ALL_GATHER:
            agreed = bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))
        else:
            agreed = multihost_utils.reached_preemption_sync_point(step)
        if agreed:
            logging.warning("preemption: every host saves a checkpoint at step %d, then stops", step)
        return agreed
