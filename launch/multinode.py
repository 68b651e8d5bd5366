"""Multi-host GPU (or CPU) start-up: map a scheduler's environment to jax.distributed, then exec ldm-jax.

    srun python -m launch.multinode --from=slurm -- train --config=C --workdir=W        # SLURM
    python -m launch.multinode --from=torchrun -- train ...     # MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK
    python -m launch.multinode --coordinator=host0:12355 --num_processes=4 --process_id=2 -- train ...

Sets `LDM_JAX_COORDINATOR`, `LDM_JAX_NUM_PROCESSES` and `LDM_JAX_PROCESS_ID`, which
`ldm_jax.parallel.mesh.initialize_distributed` reads, and replaces itself with
`python -m ldm_jax.cli ARGS` (ARGS: everything after `--`); `--dry-run` prints that command with its
environment instead. Run it from the repository root.

One process per node, driving all of the node's GPUs: that is the layout this launcher is for, and
the one JAX's own SLURM detection (`--config.distributed.auto=True`, i.e. `jax.distributed.initialize()`
without arguments) does not give: it binds each process to the single GPU `SLURM_LOCALID`, which
suits one task per GPU. With one task per GPU, use `--config.distributed.auto=True` and no launcher.
The mapping is also needed where JAX detects nothing (torchrun-style variables, hand-started
processes) and for node lists its parser reads wrongly (several bracket groups, `rack[1-2]-n[01-04]`).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Mapping, Sequence

COORDINATOR, NUM_PROCESSES, PROCESS_ID = "LDM_JAX_COORDINATOR", "LDM_JAX_NUM_PROCESSES", "LDM_JAX_PROCESS_ID"
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
SOURCES = ("slurm", "torchrun")


def expand_hostlist(spec: str) -> list[str]:
    """SLURM's hostlist syntax -> host names: "node[01-03,07],gpu-a" -> node01 node02 node03 node07 gpu-a.

    Ranges keep the zero padding of their lower bound; several bracket groups in one name expand
    to every combination ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"host list {spec!r}: unbalanced brackets")
        if char == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"host list {spec!r}: unbalanced brackets")
    items.append(spec[start:])
    hosts = [host for item in items if item for host in _expand_name(item, spec)]
    if not hosts:
        raise ValueError(f"host list {spec!r} names no host")
    return hosts


def _expand_name(name: str, spec: str) -> list[str]:
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\](.*)", name)
    if not match:
        return [name]
    prefix, ranges, rest = match.groups()
    numbers = []
    for part in ranges.split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not bounds or int(bounds[2] or bounds[1]) < int(bounds[1]):
            raise ValueError(f"host list {spec!r}: bad range {part!r} (expected N or N-M with N <= M)")
        width = len(bounds[1])
        numbers += [str(n).zfill(width) for n in range(int(bounds[1]), int(bounds[2] or bounds[1]) + 1)]
    return [prefix + number + tail for number in numbers for tail in _expand_name(rest, spec)]


def distributed_env(coordinator: str, num_processes: int, process_id: int) -> dict[str, str]:
    """The three LDM_JAX_* variables, checked: "host:port", 0 <= process_id < num_processes."""
    if not re.fullmatch(r"[^:\s]+:\d+", coordinator or ""):
        raise ValueError(f"coordinator={coordinator!r}: expected host:port")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"num_processes={num_processes}, process_id={process_id}: need 0 <= process_id < num_processes")
    return {COORDINATOR: coordinator, NUM_PROCESSES: str(num_processes), PROCESS_ID: str(process_id)}


def _require(environ: Mapping[str, str], names: Sequence[str], source: str) -> list[str]:
    missing = [name for name in names if not environ.get(name)]
    if missing:
        raise ValueError(f"--from={source}: {', '.join(missing)} not set (run this under {source})")
    return [environ[name] for name in names]


def _one_process_per_node(count: int, variable: str) -> None:
    if count > 1:
        raise ValueError(
            f"{variable} says {count} processes per node; this launcher runs one process per node (it uses all "
            "the node's GPUs). For one process per GPU use --config.distributed.auto=True without the launcher")


def slurm_env(environ: Mapping[str, str], port: int | None = None) -> dict[str, str]:
    """SLURM_PROCID / SLURM_NTASKS / the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST,
    SLURM_NODELIST) -> LDM_JAX_*. Port: `port`, else JAX's choice for SLURM jobs (SLURM_JOB_ID mod
    4096 + 61440, so jobs sharing a node differ), else 12355."""
    process_id, num_processes = _require(environ, ("SLURM_PROCID", "SLURM_NTASKS"), "slurm")
    nodelist = next((environ[v] for v in NODELIST_VARIABLES if environ.get(v)), None)
    if nodelist is None:
        raise ValueError(f"--from=slurm: none of {', '.join(NODELIST_VARIABLES)} is set (run this under srun)")
    for variable in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if environ.get(variable):  # e.g. "2(x3),1"
            _one_process_per_node(max(int(n) for n in re.findall(r"(\d+)(?:\(x\d+\))?", environ[variable])), variable)
            break
    if port is None:
        job_id = environ.get("SLURM_JOB_ID", "")
        port = int(job_id) % 4096 + 61440 if job_id.isdigit() else 12355
    return distributed_env(f"{expand_hostlist(nodelist)[0]}:{port}", int(num_processes), int(process_id))


def torchrun_env(environ: Mapping[str, str], port: int | None = None) -> dict[str, str]:
    """MASTER_ADDR, MASTER_PORT (or `port`), WORLD_SIZE, RANK -> LDM_JAX_*. Under torchrun itself its
    agent's store listens on MASTER_PORT: pass another `port`."""
    address, master_port, world_size, rank = _require(
        environ, ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"), "torchrun")
    if environ.get("LOCAL_WORLD_SIZE"):
        _one_process_per_node(int(environ["LOCAL_WORLD_SIZE"]), "LOCAL_WORLD_SIZE")
    return distributed_env(f"{address}:{port or master_port}", int(world_size), int(rank))


def ldm_jax_argv(args: Sequence[str]) -> list[str]:
    """`ldm-jax ARGS` with this interpreter."""
    return [sys.executable, "-m", "ldm_jax.cli", *args]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.multinode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", choices=SOURCES, help="read the mapping from this launcher's environment")
    parser.add_argument("--coordinator", default="", help="host:port of process 0 (explicit mapping)")
    parser.add_argument("--num_processes", type=int, default=0)
    parser.add_argument("--process_id", type=int, default=-1)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (--from modes)")
    parser.add_argument("--dry-run", action="store_true", help="print the command and its environment, do not run it")
    return parser


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    if args.source and args.coordinator:
        raise ValueError("give either --from or --coordinator/--num_processes/--process_id, not both")
    if args.source == "slurm":
        return slurm_env(environ, args.port)
    if args.source == "torchrun":
        return torchrun_env(environ, args.port)
    if not args.coordinator:
        raise ValueError("give --from=slurm|torchrun or --coordinator, --num_processes and --process_id")
    return distributed_env(args.coordinator, args.num_processes, args.process_id)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    parser = _parser()
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        parser.error("put the ldm-jax command after --, e.g. -- train --config=... --workdir=...")
    args = parser.parse_args(argv[: argv.index("--")])
    command = ldm_jax_argv(argv[argv.index("--") + 1:])
    try:
        mapping = resolve(args, environ)
    except ValueError as error:
        print(f"launch.multinode: error: {error}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(shlex.join(["env", *[f"{k}={v}" for k, v in mapping.items()], *command]), flush=True)
        return 0
    print(f"launch.multinode: process {mapping[PROCESS_ID]} of {mapping[NUM_PROCESSES]}, coordinator "
          f"{mapping[COORDINATOR]}", file=sys.stderr, flush=True)
    os.execve(command[0], command, {**environ, **mapping})


if __name__ == "__main__":
    sys.exit(main())
