"""Logical axis names and the ONE table that maps them to mesh axes.

Every parameter of every model carries logical axis names through
`nn.with_logical_partitioning(init, names)`. The names used by the models are:

  params        meaning                                              mesh axis
  ------------  ---------------------------------------------------  ---------
  embed         transformer width D                                   fsdp
  mlp           MLP hidden width (4D)                                 tensor
  heads         attention heads                                       tensor
  kv            per-head feature dim                                  -
  qkv           the q/k/v stacking axis of a fused projection         -
  modulation    adaLN modulation outputs (k * D)                      tensor
  vocab         rows of an embedding table (classes + null class)     -
  freq          sinusoidal frequency features                         -
  conv_h/conv_w convolution window                                    -
  channels_in   convolution input channels                            -
  channels_out  convolution output channels                           fsdp
  norm          normalisation scale / bias                            -

Activations use the `activation_*` names below (batch over data x fsdp).

Models only name axes; this table alone decides the layout (MaxText style), so changing the
parallelism strategy never touches model code.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None). First match wins.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("modulation", "tensor"),
    ("vocab", None),
    ("freq", None),
    ("conv_h", None),
    ("conv_w", None),
    ("channels_in", None),
    ("channels_out", "fsdp"),
    ("norm", None),
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
)


def logical_specs(boxed_tree: Any) -> Any:
    """Logical `PartitionSpec`s of a tree of `nn.Partitioned` boxes (e.g. `jax.eval_shape(init)`)."""
    return nn.get_partition_spec(boxed_tree)


def mesh_shardings(
    logical_spec_tree: Any,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> Any:
    """Maps a tree of logical `PartitionSpec`s to `NamedSharding`s on `mesh` through `rules`."""
    return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, rules)


def _fit_spec(spec: jax.sharding.PartitionSpec, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> jax.sharding.PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (e.g. a 3-channel output conv under
    fsdp=8): such a dimension stays replicated instead of failing to compile."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for name in names:
            if dim % (mesh.shape[name] * math.prod(mesh.shape[k] for k in kept)) == 0:
                kept.append(name)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return jax.sharding.PartitionSpec(*fitted)


def state_shardings(
    boxed_abstract_tree: Any,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> Any:
    """`NamedSharding`s for a tree whose parameter leaves are `nn.Partitioned` boxes.

    `boxed_abstract_tree`: e.g. `jax.eval_shape` of a function building the whole train state from
    `model.init(...)` (optax states built from boxed params keep the boxes, so optimizer moments and
    EMA copies get their parameter's layout). Unboxed leaves (step counters, RNG keys) are
    replicated. Mesh axes that do not divide a dimension are dropped for that dimension.
    The result matches the structure of `nn.unbox(boxed_abstract_tree)`.
    """
    mesh_specs = nn.logical_to_mesh(logical_specs(boxed_abstract_tree), rules)
    shapes = nn.unbox(boxed_abstract_tree)
    return jax.tree_util.tree_map(
        lambda spec, leaf: jax.sharding.NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
