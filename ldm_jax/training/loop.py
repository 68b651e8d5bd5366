"""The training loop: mesh, sharded state, grain data, jitted step, orbax checkpoints, clu logging.

    train(config, workdir) -> final TrainState

Resumes from the newest readable checkpoint in `<workdir>/checkpoints` (state + data iterator), so a
killed or preempted run continues exactly where its last checkpoint was; SIGTERM (TPU VM
preemption) saves a checkpoint before exiting, at a step all hosts agree on (`training/preemption.py`).
A workdir belongs to one run (`training/workdir.py`): a second run at once is refused, and so is a
restart whose config changes the state or the maths (`train.force_new=True` moves the old
checkpoints aside instead). A step whose loss, gradients or updated state are not finite is not
applied; then `train.nonfinite` (`training/nonfinite.py`) stops the run with an error naming the
step, before anything is saved after it ("stop"), skips the step ("skip"), or goes back to the last
checkpoint with the data past the bad batches ("rollback"); the loop's step numbers checkpoints and
logs, `state.step` counts the updates applied. At the end the EMA parameters are exported as a model bundle to `<workdir>/model`; previews (sample grids)
go to TensorBoard and to `<workdir>/previews/step_<n>.png`.

The workdir is a local path or a `gs://` URI (`ldm_jax/storage.py`). TensorBoard logs go to
`tensorboard_logdir(workdir)` through clu's writer, which writes with `tf.io.gfile` (gs:// works on
a TPU VM); `LDM_JAX_TENSORBOARD=0` turns them off (metrics in the log only), for a store that
`tf.io.gfile` cannot reach, such as the local GCS emulator of the tests.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils

from ldm_jax import storage
from ldm_jax.data import pipeline
from ldm_jax.inference import generation
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.training import checkpointing, nonfinite, optimizers, steps, tasks
from ldm_jax.training.preemption import Preemption
from ldm_jax.training import workdir as workdir_lib
from ldm_jax.training.state import TrainState, init_sharded_state


TENSORBOARD_ENV = "LDM_JAX_TENSORBOARD"


class OtherRunError(ValueError):
    """The workdir's checkpoints were written with a config that differs in the state or the maths."""


def validate_config(config: Any) -> None:
    """Errors a user can cause, before anything is compiled."""
    train = config.train
    for field in ("num_steps", "log_every", "checkpoint_every", "accumulation_steps"):
        if int(train[field]) < 1:
            raise ValueError(f"train.{field}={train[field]}: must be >= 1")
    if config.task not in tasks.TASKS:
        raise ValueError(f"task={config.task!r}: allowed values are {tasks.TASKS}")
    if config.data.batch_size % train.accumulation_steps:
        raise ValueError(
            f"data.batch_size={config.data.batch_size} is not divisible by "
            f"train.accumulation_steps={train.accumulation_steps}"
        )
    nonfinite.Policy.from_config(train)


@contextlib.contextmanager
def _own_workdir(workdir: str):
    """Process 0 holds the workdir's `RunLock` for the run; every process fails together when it can't."""
    lock, error = (workdir_lib.RunLock(workdir) if jax.process_index() == 0 else None), None
    if lock is not None:
        try:
            lock.__enter__()
        except ValueError as refused:
            error = refused
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(error is not None)) and error is None:
        raise ValueError(f"workdir {workdir} is in use by another run (see process 0's error)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def tensorboard_logdir(workdir: str) -> str | None:
    """Where TensorBoard logs and profiles go: the workdir (a local path made absolute, or the URI
    as given), or None when `LDM_JAX_TENSORBOARD=0` (metrics are then only logged)."""
    if os.environ.get(TENSORBOARD_ENV, "1") == "0":
        return None
    return storage.join(workdir)


def _make_checkpointer(config: Any, workdir: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(
        storage.join(workdir, "checkpoints"),
        save_every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
        keep_every=config.train.get("keep_every") or None,
    )


def _resume(config: Any, workdir: str, state: TrainState, data: Any) -> tuple[checkpointing.Checkpointer, TrainState, int]:
    """(checkpointer, state, step): the newest usable checkpoint of this run, or a fresh start.

    Refuses checkpoints of another config (OtherRunError) or none readable (UnreadableCheckpointsError),
    unless `train.force_new`, which moves `<workdir>/checkpoints` aside (never deletes it) and starts over.
    """
    current = config.to_dict()

    def same_run(saved: dict, step: int) -> None:
        differences = workdir_lib.config_differences(saved, current)
        if differences:
            raise OtherRunError(
                f"workdir {workdir} holds a run with another config (checkpoint step {step}): "
                f"{'; '.join(differences)}. Use a new workdir, or --config.train.force_new=True to move its "
                f"checkpoints aside and start over"
            )

    checkpointer = _make_checkpointer(config, workdir)
    try:
        restored = checkpointer.restore(checkpointing.abstract_like(state), data.iterator, check_config=same_run)
    except Exception as refused:
        checkpointer.close()
        if not (config.train.force_new and isinstance(refused, (OtherRunError, checkpointing.UnreadableCheckpointsError))):
            raise
        aside = f"{checkpointer.directory}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            storage.move(checkpointer.directory, aside)
        multihost_utils.sync_global_devices("ldm_jax.loop.force_new")
        logging.warning("train.force_new: moved the old checkpoints to %s (%s)", aside, str(refused).splitlines()[0])
        return _make_checkpointer(config, workdir), state, 0
    if restored is None:
        return checkpointer, state, 0
    logging.info("resumed from step %d in %s", restored[1], checkpointer.directory)
    return checkpointer, restored[0], restored[1]


def train(config: Any, workdir: str) -> TrainState:
    validate_config(config)
    mesh_lib.initialize_distributed(config.distributed)
    with _own_workdir(workdir):
        return _train(config, workdir)


def _train(config: Any, workdir: str) -> TrainState:
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    batch_sharding = pipeline.batch_sharding(mesh)
    pipeline.per_host_batch_size(config.data.batch_size, batch_sharding, jax.process_count())

    task = tasks.make_task(config)
    tx = optimizers.make_optimizer(config.optimizer)
    learning_rate = optimizers.learning_rate_schedule(config.optimizer)
    state, state_shardings = init_sharded_state(task.init_params, tx, jax.random.PRNGKey(config.seed), mesh)
    frozen = jax.device_put(task.frozen, mesh_lib.replicated(mesh))
    data = pipeline.make_pipeline(config.data, batch_sharding, text=config.text)

    try:
        checkpointer, state, start_step = _resume(config, workdir, state, data)
    except BaseException:
        data.close()
        raise

    policy = nonfinite.Policy.from_config(config.train)
    responder = nonfinite.Responder(  # train.nonfinite: what a non-finite step does (training/nonfinite.py)
        policy, checkpointer,
        initial_state=lambda: init_sharded_state(task.init_params, tx, jax.random.PRNGKey(config.seed), mesh)[0],
        place=lambda guard: jax.device_put(guard, mesh_lib.replicated(mesh)),
    )
    step_fn = jax.jit(
        nonfinite.guarded(functools.partial(
            steps.train_step, loss_fn=task.loss_fn, tx=tx, learning_rate=learning_rate,
            ema_decay=config.ema.decay, ema_warmup=config.ema.warmup,
            accumulation_steps=config.train.accumulation_steps,
        ), policy),
        in_shardings=(state_shardings, None, None, batch_sharding),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh), mesh_lib.replicated(mesh)),
        donate_argnums=0,
    )

    logdir = tensorboard_logdir(workdir) if jax.process_index() == 0 else None
    summaries = metric_writers.SummaryWriter(logdir) if logdir is not None else None
    writer = metric_writers.AsyncMultiWriter([metric_writers.LoggingWriter()] + ([summaries] if summaries else []))
    if start_step == 0:
        _record_new_run(config, state.params, workdir, summaries)
    num_steps = config.train.num_steps
    hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
    if config.train.profile_steps and logdir is not None and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(logdir=logdir, num_profile_steps=config.train.profile_steps))

    compiled = None
    step_flops = 0.0
    last_log_time, last_log_step = time.perf_counter(), start_step
    try:
        with Preemption() as preemption:  # every host saves at the same step (training/preemption.py)
            step = furthest = start_step
            guard = responder.guard(step)
            while step < num_steps:
                step += 1
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    batch = next(data)
                    if compiled is None:
                        compiled = step_fn.lower(state, guard, frozen, batch).compile()
                        step_flops = _flops(compiled)
                    state, guard, metrics = compiled(state, guard, frozen, batch)
                if step > furthest:  # clu's hooks count forward; a rollback runs some steps again
                    furthest = step
                    for hook in hooks:
                        hook(step)
                preempted = preemption.reached(step)
                save_due = step % config.train.checkpoint_every == 0 or step == num_steps or preempted
                if save_due or step % config.train.log_every == 0:
                    rolled_back = responder.check(step, state, guard)  # or raises NonFiniteLossError
                    if rolled_back is not None:
                        state, guard, step = rolled_back
                        last_log_time, last_log_step = time.perf_counter(), step
                        if preempted:  # the step rolled back to is the newest checkpoint already
                            break
                        continue
                if step % config.train.log_every == 0 or step == num_steps:
                    now = time.perf_counter()
                    steps_per_s = (step - last_log_step) / max(now - last_log_time, 1e-9)
                    last_log_time, last_log_step = now, step
                    scalars = {k: float(v) for k, v in metrics.items() if k != "finite"}
                    scalars.update(responder.scalars(step, state))
                    scalars.update(
                        steps_per_s=steps_per_s,
                        images_per_s=steps_per_s * config.data.batch_size,
                        tflops_per_s_per_device=steps_per_s * step_flops / 1e12,
                    )
                    if config.train.peak_tflops_per_device:
                        scalars["mfu"] = scalars["tflops_per_s_per_device"] / config.train.peak_tflops_per_device
                    writer.write_scalars(step, scalars)
                if save_due:
                    checkpointer.save(step, state, data.iterator, config=config.to_dict(), force=True)
                if config.train.preview_every and (step % config.train.preview_every == 0 or step == num_steps):
                    grid = task.preview(state.ema_params, frozen, jax.random.fold_in(jax.random.PRNGKey(config.seed), step))
                    writer.write_images(step, {"samples": grid[None]})
                    if jax.process_index() == 0:
                        path = generation.save_png(grid, storage.join(workdir, "previews", f"step_{step:08d}.png"))
                        logging.info("preview written to %s", path)
                if preempted:
                    break
    finally:  # pending async saves complete even when a step fails
        checkpointer.close()
        writer.flush()
        data.close()
    if step == num_steps:  # not when preempted (state.step < num_steps when steps were skipped)
        task.export(storage.join(workdir, "model"), state.ema_params)
    return state


def _record_new_run(config: Any, params: Any, workdir: str, summaries: Any) -> None:
    """The hyperparameters (to TensorBoard) and the parameter table (to `<workdir>/parameters.txt`) of
    a new run; the terminal gets one line, not a dictionary and a table of every parameter."""
    if summaries is not None:
        summaries.write_hparams(_flatten(config.to_dict()))
    count = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
    if jax.process_index() == 0:
        table = storage.join(workdir, "parameters.txt")
        storage.write_atomic(table, (parameter_overview.get_parameter_overview(params) + "\n").encode())
        logging.info("%s parameters (table: %s; hyperparameters: the config in each checkpoint%s)",
                     f"{count:,}", table, " and TensorBoard" if summaries is not None else "")


def _flops(compiled: Any) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float((analysis or {}).get("flops", 0.0))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
