"""Shared measuring tools for the benchmark scripts: timing, FLOPs, matmul peak, machine name.

Benchmarks print numbers; they are never tests. Run them on an idle machine: numbers move with load.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def machine_name() -> str:
    """E.g. 'AMD EPYC 9B14 (2 cores), jax 0.10.2 cpu'."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    kind = device.device_kind if device.platform != "cpu" else "cpu"
    return f"{cpu} ({os.cpu_count()} cores), jax {jax.__version__} {kind} x{jax.device_count()}"


def block(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn(*args)` (outputs blocked on), after `warmup` untimed calls."""
    for _ in range(warmup):
        block(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compiled_flops(jitted: Any, *args: Any) -> float:
    """FLOPs of one call, as XLA's cost analysis of the compiled program counts them."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returns one dict per program
        analysis = analysis[0]
    return float(analysis["flops"])


def matmul_peak_gflops(n: int = 4096, dtype: Any = jnp.float32, repeats: int = 5) -> float:
    """Achieved GFLOP/s of a jitted n x n `jnp.dot`: the ceiling that MFU is measured against."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    seconds = median_seconds(jax.jit(jnp.dot), a, b, repeats=repeats)
    return 2 * n**3 / seconds / 1e9


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (host memory; the CPU backend's arrays live there)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
