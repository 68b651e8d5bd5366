"""The device mesh ('data', 'fsdp', 'tensor') from a config, and multi-host start-up.

Config fields (a `mesh` section of the experiment's ConfigDict):
  data, fsdp, tensor: int sizes of the three axes; one of them may be -1 ("all the rest").
Multi-host (a `distributed` section):
  coordinator_address ("host:port"), num_processes, process_id: given explicitly for GPU clusters
  and local tests; read from the environment (`LDM_JAX_COORDINATOR`, `LDM_JAX_NUM_PROCESSES`,
  `LDM_JAX_PROCESS_ID`) when unset; on Cloud TPU pods `jax.distributed.initialize()` discovers
  everything by itself (`auto: True`).
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ldm_jax.parallel.partitioning import MESH_AXES

BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves `{'data': -1, 'fsdp': 2, 'tensor': 1}` against `num_devices` into a full shape."""
    shape = []
    for axis in MESH_AXES:
        size = sizes.get(axis, 1)
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{axis}={size!r}: must be a positive int or -1 (fill)")
        shape.append(size)
    fills = [axis for axis, size in zip(MESH_AXES, shape) if size == -1]
    if len(fills) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {fills}")
    known = math.prod(size for size in shape if size != -1)
    if fills:
        if num_devices % known:
            raise ValueError(
                f"mesh: the fixed axes ({dict(zip(MESH_AXES, shape))}) multiply to {known}, "
                f"which does not divide the {num_devices} devices"
            )
        shape[MESH_AXES.index(fills[0])] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh: data x fsdp x tensor = {' x '.join(map(str, shape))} = {math.prod(shape)} "
            f"must equal the number of devices ({num_devices}); set one axis to -1 to fill"
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Any = None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def initialize_distributed(config: Mapping[str, Any] | None = None) -> None:
    """Starts `jax.distributed` when this run spans several processes; a no-op for one process.

    Must run before any other JAX call. `config` may hold coordinator_address, num_processes,
    process_id and auto (TPU pods: let JAX discover the topology).
    """
    config = dict(config or {})
    address = config.get("coordinator_address") or os.environ.get("LDM_JAX_COORDINATOR")
    if config.get("auto"):
        jax.distributed.initialize()
        return
    if not address:
        return
    num_processes = int(config.get("num_processes") or os.environ.get("LDM_JAX_NUM_PROCESSES", 0))
    process_id = config.get("process_id")
    if process_id is None or int(process_id) < 0:  # -1: unset in the config
        process_id = os.environ.get("LDM_JAX_PROCESS_ID")
    if num_processes < 1 or process_id is None:
        raise ValueError(
            "distributed.coordinator_address is set, so distributed.num_processes and "
            "distributed.process_id (or LDM_JAX_NUM_PROCESSES / LDM_JAX_PROCESS_ID) are required"
        )
    # Cross-process collectives on the CPU backend (local tests, CPU clusters); accelerators
    # ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=int(process_id)
    )
