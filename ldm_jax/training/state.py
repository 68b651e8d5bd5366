"""The train state: one pytree (step, params, EMA params, optimizer state, RNG), checkpointed whole."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from ldm_jax.parallel import partitioning


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; all leaves are arrays (checkpointed whole).

    step: scalar int32, optimizer updates taken.
    params: the model's 'params' collection (float32).
    ema_params: exponential moving average of `params` (what is sampled from).
    opt_state: the optax state.
    rng: the run's PRNG key (raw uint32[2]); each step folds in `step` and splits per purpose.

    The optax transformation is not part of the state: it is configuration, passed to the step.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


def init_train_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=rng,
    )


def apply_gradients(
    state: TrainState, grads: Any, tx: optax.GradientTransformation, ema_decay: jax.Array
) -> TrainState:
    """One optimizer update, then the EMA update with `ema_decay` (scalar)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(
        step=state.step + 1,
        params=params,
        ema_params=ema_update(state.ema_params, params, ema_decay),
        opt_state=opt_state,
    )


def ema_update(ema: Any, new: Any, decay: jax.Array) -> Any:
    """ema <- decay * ema + (1 - decay) * new, leaf by leaf."""
    return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p - e), ema, new)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay for `step` (0-based count of updates done).

    With `warmup`, min(decay, (1 + step) / (10 + step)) so that early averages are not dominated by
    the random initialisation; otherwise the constant `decay` (DiT: 0.9999, no warm-up).
    """
    if not 0.0 <= float(decay) <= 1.0:  # also refuses nan
        raise ValueError(f"ema.decay={decay!r}: must be in [0, 1] (DiT: 0.9999)")
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def init_sharded_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
) -> tuple[TrainState, Any]:
    """Builds the TrainState directly in its sharded layout (no host or single-device copy).

    init_params(key) -> the model's BOXED 'params' (e.g. `lambda k: model.init(k, ...)["params"]`).
    The layout of every leaf (params, EMA, optimizer moments) comes from the parameters' logical axis
    names through `partitioning.state_shardings`. Returns (state, state_shardings).
    """
    init_key, state_rng = jax.random.split(rng)

    def boxed_state():
        return init_train_state(init_params(init_key), tx, state_rng)

    shardings = partitioning.state_shardings(jax.eval_shape(boxed_state), mesh)
    state = jax.jit(lambda: nn.unbox(boxed_state()), out_shardings=shardings)()
    return state, shardings


def tree_all_finite(tree: Any) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (integer leaves are skipped)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)
