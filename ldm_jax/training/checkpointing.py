"""orbax checkpoints of a run: the TrainState, the input iterator's state and the config.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}`. orbax writes each step to a temporary
directory and renames it when complete, so a kill mid-save never touches the latest good step; a
step directory that still fails to restore (e.g. truncated files) is skipped with a warning and the
previous step is used.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp

STATE, DATA, CONFIG = "state", "data", "config"


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
            raise ValueError(f"checkpoint.save_every={save_every}: must be >= 1")
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep}: must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
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
        """Starts saving (returns at once when async); True if a checkpoint was started."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(dict(config))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self,
        abstract_state: Any,
        data_iterator: grain.DatasetIterator | None = None,
        step: int | None = None,
    ) -> tuple[Any, int] | None:
        """Restores `step` (default: the newest readable one) into the layout of `abstract_state`.

        `abstract_state`: a pytree of `jax.ShapeDtypeStruct`s (with shardings, to restore onto any
        mesh) or of arrays. The iterator, if given, is restored in place. Returns (state, step),
        or None when there is no checkpoint.
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        for candidate in steps:
            items = {STATE: ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self._manager.restore(candidate, args=ocp.args.Composite(**items))
            except Exception as error:  # noqa: BLE001 - any failure means this step is unusable
                if step is not None:
                    raise
                logging.warning(
                    "checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one",
                    candidate, self.directory, type(error).__name__, error,
                )
                continue
            return restored[STATE], candidate
        return None

    def restore_config(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (keeping shardings) of a pytree of arrays: a restore target."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )

