"""What a run does when a step's loss, gradients or updated state are not finite: `train.nonfinite`.

Policies (`train.nonfinite`, limit `train.nonfinite_max`):

* "stop" (default): the bad step is not applied, no later step is applied either, and the run stops
  with `NonFiniteLossError` naming the step, before anything is saved after it.
* "skip": the bad step is not applied and training goes on with the next batch. More than
  `nonfinite_max` bad steps in a row: the run stops as with "stop" (naming those steps). The number
  of steps not applied so far goes to the logs as the scalar `nonfinite_skipped`.
* "rollback": the run goes back to the newest checkpoint's state and step (the initial state and
  step 0 when none was saved yet), while the data iterator stays where it is, past the bad batches:
  the steps after the checkpoint are run again on new batches. More than `nonfinite_max` rollbacks
  without a check past the step where the last one happened: the run stops. `nonfinite_rollbacks`
  (rollbacks by this process) goes to the logs.

Steps. The loop's step numbers the steps run (checkpoints and logs are numbered by it, and the run
ends at `train.num_steps`); `state.step` counts the updates applied, and is what the step's RNG key
(`fold_in(state.rng, state.step)`), the learning-rate schedule and the EMA warm-up follow. A skipped
step leaves the whole state as it was, `state.step` included, so the next batch draws the key the
skipped one drew, and `loop step - state.step` is the number of skipped steps: it is saved with
every checkpoint (through `state.step`), so a resumed run logs the same count. The exported model
is the EMA after the last step (fewer updates than `num_steps` when steps were skipped).

No host sync per step: a `Guard` (a few replicated scalars) is updated inside the jitted step
(`guarded`), and the loop reads it only where it already waits for the device: at log steps, save
steps (every `checkpoint_every`, the last step, a preemption). To make that delay harmless, the first
bad step under "stop" and "rollback", and the bad step past the limit under "skip", *halt* the run:
no later update is applied until the check (the state stays as it was before that step), so a check
acts as if it had run right after the bad step; it is never saved.

Exact resume: what the policies decide from is in the checkpoint (the state, the data iterator) or is
a function of step numbers (where checks happen: `log_every`, `checkpoint_every`), so a run with
skips or rollbacks that is killed and resumed is bit-exact with a straight run (with the same
`log_every` and `checkpoint_every`). Not saved: the count of bad steps in a row and of rollbacks in
a row restart at 0 on resume, so a resumed run may allow up to `nonfinite_max` more before stopping.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ("stop", "skip", "rollback")


class NonFiniteLossError(FloatingPointError):
    """The loss, gradients or updated state became NaN/inf; the state of the step before is what was kept."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """`train.nonfinite` and `train.nonfinite_max`, checked."""

    name: str = "stop"
    max_in_a_row: int = 5

    @classmethod
    def from_config(cls, train: Any) -> "Policy":
        name, limit = train.nonfinite, train.nonfinite_max
        if name not in POLICIES:
            raise ValueError(f"train.nonfinite={name!r}: allowed values are {POLICIES}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"train.nonfinite_max={limit!r}: must be an integer >= 1")
        return cls(name, limit)


def new_guard(step: int) -> dict[str, np.ndarray]:
    """A Guard (host arrays; the loop places it replicated) after loop step `step`, nothing bad seen.

    step: the loop step of the last step run. run: bad steps in a row up to it. halted_at: the step
    that halted the run (0: none). halted_loss: that step's loss.
    """
    return {"step": np.int32(step), "run": np.int32(0), "halted_at": np.int32(0), "halted_loss": np.float32(0)}


def guarded(train_step: Callable[..., tuple[Any, dict]], policy: Policy) -> Callable[..., tuple[Any, dict, dict]]:
    """`train_step(state, frozen, batch, allow=...)` -> `step(state, guard, frozen, batch)` ->
    `(state, guard, metrics)`, which applies no update once the guard is halted (jit it whole)."""

    def step(state, guard, frozen, batch):
        state, metrics = train_step(state, frozen, batch, allow=guard["halted_at"] == 0)
        return state, advance(guard, metrics["finite"] > 0, metrics["loss"], policy), metrics

    return step


def advance(guard: dict, finite: jax.Array, loss: jax.Array, policy: Policy) -> dict:
    """The Guard after one more step whose update was applied iff `finite` (traced; pure)."""
    step = guard["step"] + 1
    run = jnp.where(finite, 0, guard["run"] + 1).astype(jnp.int32)
    halts = ~finite & (run > policy.max_in_a_row) if policy.name == "skip" else ~finite
    first = (guard["halted_at"] == 0) & halts
    return {
        "step": step,
        "run": run,
        "halted_at": jnp.where(first, step, guard["halted_at"]).astype(jnp.int32),
        "halted_loss": jnp.where(first, loss, guard["halted_loss"]).astype(jnp.float32),
    }


class Responder:
    """The host side of a policy: at each check, stops the run, or rolls it back, or lets it go on.

    checkpointer: the run's `checkpointing.Checkpointer`. initial_state(): the run's state at step 0
    (for a rollback before the first checkpoint). place(guard): the guard on the devices.
    """

    def __init__(self, policy: Policy, checkpointer: Any, initial_state: Callable[[], Any],
                 place: Callable[[dict], dict]):
        self.policy = policy
        self._checkpointer = checkpointer
        self._initial_state = initial_state
        self._place = place
        self.rollbacks = 0  # by this process
        self._in_a_row = 0
        self._last_rollback_at = -1

    def guard(self, step: int) -> dict:
        return self._place(new_guard(step))

    def scalars(self, step: int, state: Any) -> dict[str, float]:
        """What goes to the logs: steps not applied so far (and rollbacks, under "rollback")."""
        scalars = {"nonfinite_skipped": float(step - int(state.step))}
        if self.policy.name == "rollback":
            scalars["nonfinite_rollbacks"] = float(self.rollbacks)
        return scalars

    def check(self, step: int, state: Any, guard: dict) -> tuple[Any, dict, int] | None:
        """None when the run goes on from `step` as it is; `(state, guard, step)` to go on from after
        a rollback; raises NonFiniteLossError (one line) when the policy says stop."""
        halted_at = int(guard["halted_at"])
        if not halted_at:
            if step > self._last_rollback_at:
                self._in_a_row = 0
            return None
        loss = float(guard["halted_loss"])
        latest = self._checkpointer.latest_step()
        saved = (f"Latest good checkpoint: step {latest} in {self._checkpointer.directory}" if latest is not None
                 else "No checkpoint was saved before it")
        if self.policy.name == "skip":
            first = halted_at - self.policy.max_in_a_row
            raise NonFiniteLossError(
                f"non-finite loss, gradients or updated parameters at steps {first}..{halted_at}, more than "
                f"train.nonfinite_max={self.policy.max_in_a_row} in a row (loss={loss}); they were not applied. {saved}")
        if self.policy.name == "stop" or self._in_a_row >= self.policy.max_in_a_row:
            again = (f" after {self._in_a_row} rollbacks in a row (train.nonfinite_max={self.policy.max_in_a_row})"
                     if self.policy.name == "rollback" else "")
            raise NonFiniteLossError(
                f"non-finite loss, gradients or updated parameters at step {halted_at} (loss={loss}){again}; "
                f"the update was not applied. {saved}")
        return self._rollback(step, halted_at, state)

    def _rollback(self, step: int, halted_at: int, state: Any) -> tuple[Any, dict, int]:
        from ldm_jax.training import checkpointing  # noqa: PLC0415 - keeps this module light to import

        self._checkpointer.wait()
        latest = self._checkpointer.latest_step()
        if latest is None:
            restored, back_to = self._initial_state(), 0
        else:
            restored, back_to = self._checkpointer.restore(checkpointing.abstract_like(state), step=latest)
        self.rollbacks += 1
        self._in_a_row += 1
        self._last_rollback_at = step
        logging.warning("non-finite step %d: rolled back to step %d (rollback %d in a row); the data goes on "
                        "after step %d's batch", halted_at, back_to, self._in_a_row, step)
        return restored, self.guard(back_to), back_to
