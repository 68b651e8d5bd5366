"""orbax checkpoints of a run: the TrainState, the input iterator's state and the config.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}`, a local path or a `gs://` URI. A step
is complete once orbax finalises it: locally it writes `<step>.orbax-checkpoint-tmp-*` and renames it;
on GCS (no renames) it writes `<step>/` and then `<step>/commit_success.txt`. Either way a kill
mid-save never touches the latest good step. On restore, a step that cannot be read (or holds
non-finite values) is moved aside to `<step>.corrupt` and the previous one is used; when none can be
read, the restore refuses rather than start over. A save that fails for lack of space removes its
unfinished step and says the disk is full.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from typing import Any, Callable, Mapping

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ldm_jax import storage
from ldm_jax.training.state import tree_all_finite

STATE, DATA, CONFIG = "state", "data", "config"
# What an unfinished save is named: `<step>.orbax-checkpoint-tmp-<time>` locally, `<step>` on GCS.
_STEP_OR_TEMPORARY = re.compile(r"\d+(\.orbax-checkpoint-tmp.*)?")


class UnreadableCheckpointsError(ValueError):
    """Every checkpoint step of a run failed to restore; nothing was changed on disk."""


def _is_disk_full(error: BaseException) -> bool:
    """orbax reports tensorstore's ENOSPC as a ValueError ('... No space left on device ...')."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class Checkpointer:
    """Saves every `save_every` steps (async), keeps the last `keep` plus every `keep_every`-th."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int = 1000,
        keep: int = 3,
        keep_every: int | None = None,
        async_save: bool = True,
    ):
        if save_every < 1:
            raise ValueError(f"train.checkpoint_every={save_every}: must be >= 1")
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints={keep}: must be >= 1")
        self.directory = storage.path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=save_every,
                max_to_keep=keep,
                keep_period=keep_every,
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: grain.DatasetIterator | None = None,
        config: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving (returns at once when async); True if a checkpoint was started. Raises
        OSError(ENOSPC) naming the directory when this or the previous save ran out of space."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(dict(config))
        with self._disk_full_is_reported():
            return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self,
        abstract_state: Any,
        data_iterator: grain.DatasetIterator | None = None,
        step: int | None = None,
        check_config: Callable[[dict[str, Any], int], None] | None = None,
    ) -> tuple[Any, int] | None:
        """Restores `step` (default: the newest usable one) into the layout of `abstract_state`.

        `abstract_state`: a pytree of `jax.ShapeDtypeStruct`s (with shardings, to restore onto any
        mesh) or of arrays. The iterator, if given, is restored in place, and only from the step
        whose state is returned. `check_config(saved_config, step)` sees each candidate's config
        first; what it raises propagates. Newer steps that could not be restored (or held
        non-finite values) are moved aside to `<step>.corrupt`. Returns (state, step), or None when
        there is no checkpoint; UnreadableCheckpointsError when there are some and none is usable.
        """
        if step is not None:
            return self._restore_step(step, abstract_state, data_iterator, check_config), step
        failures = []
        for candidate in sorted(self.all_steps(), reverse=True):
            try:
                state = self._restore_step(candidate, abstract_state, data_iterator, check_config)
            except _StepUnusable as unusable:
                logging.warning("checkpoint step %d in %s cannot be used (%s); trying the previous one",
                                candidate, self.directory, unusable)
                failures.append((candidate, str(unusable)))
                continue
            self._set_aside(step for step, _ in failures)
            return state, candidate
        if failures:
            raise UnreadableCheckpointsError(
                f"no checkpoint in {self.directory} can be restored: "
                + "; ".join(f"step {s}: {why}" for s, why in failures)
                + ". Nothing was changed; set --config.train.force_new=True to move them aside and start over"
            )
        return None

    def _restore_step(self, step, abstract_state, data_iterator, check_config) -> Any:
        if check_config is not None:
            try:
                saved_config = self.restore_config(step)
            except Exception as error:  # noqa: BLE001 - an unreadable config makes the step unusable
                raise _StepUnusable(f"config: {type(error).__name__}: {_first_line(error)}") from error
            check_config(saved_config, step)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
            iterator_state = data_iterator.get_state()
        try:
            state = self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]
            if not bool(jax.jit(tree_all_finite)(state)):
                raise FloatingPointError("the state holds non-finite values")
        except Exception as error:  # noqa: BLE001 - any failure means this step is unusable
            if data_iterator is not None:
                data_iterator.set_state(iterator_state)
            raise _StepUnusable(f"{type(error).__name__}: {_first_line(error)}") from error
        return state

    def _set_aside(self, steps) -> None:
        """Moves unusable steps to `<step>.corrupt` (never deleted), so a resumed run can save them anew.

        On GCS the step is copied before its objects are deleted (`storage.move`): a kill leaves the
        step, or a complete copy of it."""
        steps = list(steps)
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                source = self.directory / str(step)
                target, n = self.directory / f"{step}.corrupt", 1
                while target.exists():
                    n += 1
                    target = self.directory / f"{step}.corrupt-{n}"
                storage.move(source, target)
                logging.warning("moved the unusable checkpoint step %d aside to %s", step, target)
        multihost_utils.sync_global_devices("ldm_jax.checkpointing.set_aside")
        self._manager.reload()

    def restore_config(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        with self._disk_full_is_reported():
            self._manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    @contextlib.contextmanager
    def _disk_full_is_reported(self):
        """Turns a save's ENOSPC into OSError(ENOSPC) naming the directory, after removing the partial step."""
        try:
            yield
        except Exception as error:
            if not _is_disk_full(error):
                raise
            removed = self.remove_temporary()
            raise OSError(
                errno.ENOSPC,
                f"disk full (no space left on device) while saving a checkpoint in {self.directory}; removed "
                f"the partial save {removed or '(none)'}; the latest complete checkpoint is step {self.latest_step()}",
            ) from error

    def remove_temporary(self) -> list[str]:
        """Deletes the steps of unfinished saves; returns their names.

        Unfinished is what orbax says (`<step>.orbax-checkpoint-tmp-*` locally, a `<step>` without
        `commit_success.txt` on GCS), and only step-named folders are considered."""
        removed = []
        if jax.process_index() == 0 and self.directory.is_dir():
            for child in self.directory.iterdir():
                if _STEP_OR_TEMPORARY.fullmatch(child.name) and ocp.path.step.is_path_temporary(child):
                    child.rmtree(missing_ok=True)
                    removed.append(child.name)
        return removed


class _StepUnusable(Exception):
    """One checkpoint step failed to restore (its reason is the message)."""


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (keeping shardings) of a pytree of arrays: a restore target."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )

