"""Cloud TPU VMs: create a slice, install the project on every worker, train, follow logs, tear down.

    python -m launch.tpu_vm SUBCOMMAND --name=NAME --zone=ZONE [--project=P] [--dry-run] ...

Subcommands (each builds `gcloud` argv lists with the small pure functions below; `--dry-run`
prints them shell-quoted, one per line, instead of running them):
  create   a TPU VM (`tpu-vm create`, on demand or `--preemptible`), or with `--spot` a queued
           resource (`queued-resources create --spot`, node id = queued resource id = --name)
  install  pack this checkout (tar), copy it to every worker, build a venv there and
           `pip install -e` it with the jax[tpu] matching setup.py's jax pin; `--setup` runs a
           shell snippet on every worker afterwards (e.g. mount the bucket that holds the workdir)
  train    `ldm-jax train` on all workers at once (`--worker=all`); on a multi-host slice with
           `--config.distributed.auto=True` (jax.distributed discovers the pod by itself). Output
           streams back and is appended to ~/ldm_jax_train.log on every worker; `--detach` runs it
           under nohup instead (follow it with `logs`)
  logs     follow ~/ldm_jax_train.log of one worker (default 0) or of all
  delete   delete the VM (with --spot: the queued resource and its node)
  run      create -> install -> train -> delete, relaunching after preemption: when training stops
           and the node turns PREEMPTED (or the queued resource SUSPENDED/FAILED), the node is
           deleted, recreated and reinstalled and `ldm-jax train` resumes from the workdir's latest
           checkpoint (SIGTERM makes the loop save one before the VM goes). The run is finished when
           <workdir>/model/model.json exists (the loop exports it after the last step).

The workdir must outlive the VM under --spot or --preemptible and be seen by every worker: a
`gs://bucket/run` URI (the workers write to the bucket with their service account; nothing to
mount), or an absolute path on a shared mount (a Filestore share, set up by `--setup`). Extra
`ldm-jax train` flags (config overrides) go after `--`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]

GCLOUD_TPUS = ("gcloud", "compute", "tpus")
PROVISIONING = ("on-demand", "spot", "preemptible")

# On every worker (paths relative to the login directory, $HOME).
REMOTE_TARBALL = "ldm_jax_src.tar.gz"
REMOTE_SOURCE = "$HOME/ldm_jax"
REMOTE_VENV = "$HOME/ldm_jax_venv"
TRAIN_LOG = "$HOME/ldm_jax_train.log"
REMOTE_WORKDIR = "gs://"  # a workdir in a bucket (ldm_jax/storage.py), shared by every worker without a mount
PACK_EXCLUDES = (".venv", "workdir", "__pycache__", "*.egg-info", ".pytest_cache")

# generation -> (accelerator-type prefix, what the number in the name counts, runtime version).
GENERATIONS = {
    "v4": ("v4", "cores", "tpu-ubuntu2204-base"),
    "v5p": ("v5p", "cores", "v2-alpha-tpuv5"),
    "v5e": ("v5litepod", "chips", "v2-alpha-tpuv5-lite"),
    "v6e": ("v6e", "chips", "v2-alpha-tpuv6e"),
}
# v5e / v6e slices that exist; up to 8 chips they are one VM, above that 4 chips per VM.
CHIP_COUNTED_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
ACCELERATOR_PATTERN = re.compile(r"\b(v4|v5p|v5e|v5litepod|v6e)-(\d+)\b")


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: accelerator type (gcloud's name), chips, VMs (hosts) and default runtime."""

    accelerator: str
    generation: str
    chips: int
    hosts: int
    runtime_version: str


def parse_slice(accelerator: str) -> Slice:
    """"v4-32" -> Slice(v4-32, 16 chips, 4 hosts); v4/v5p names count TensorCores (2 per chip, 4
    chips per VM), v5e ("v5e-8" = "v5litepod-8") and v6e names count chips."""
    match = ACCELERATOR_PATTERN.fullmatch(accelerator)
    allowed = ("v4-N / v5p-N (N TensorCores, a multiple of 8), v5litepod-N / v5e-N / v6e-N "
               f"(N chips, one of {CHIP_COUNTED_SIZES})")
    if not match:
        raise ValueError(f"--accelerator={accelerator!r}: expected {allowed}")
    generation = "v5e" if match[1] == "v5litepod" else match[1]
    prefix, counts, runtime = GENERATIONS[generation]
    n = int(match[2])
    if counts == "cores":
        if n < 8 or n % 8:
            raise ValueError(f"--accelerator={accelerator!r}: expected {allowed}")
        chips, hosts = n // 2, n // 8
    else:
        if n not in CHIP_COUNTED_SIZES:
            raise ValueError(f"--accelerator={accelerator!r}: expected {allowed}")
        chips, hosts = n, 1 if n <= 8 else n // 4
    return Slice(f"{prefix}-{n}", generation, chips, hosts, runtime)


@dataclasses.dataclass(frozen=True)
class Target:
    """Which TPU: its name (also the queued resource id), zone, project ("" = gcloud's default),
    provisioning (on-demand, spot = queued resource, preemptible), slice and runtime ("" = the
    slice's default). The slice is only needed to create and to train."""

    name: str
    zone: str
    project: str = ""
    provisioning: str = "on-demand"
    slice: Slice | None = None
    version: str = ""

    def __post_init__(self):
        if self.provisioning not in PROVISIONING:
            raise ValueError(f"provisioning={self.provisioning!r}: allowed values are {PROVISIONING}")

    @property
    def queued(self) -> bool:
        return self.provisioning == "spot"

    @property
    def location(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    @property
    def healthy_state(self) -> str:
        return "ACTIVE" if self.queued else "READY"

    @property
    def lost_states(self) -> tuple[str, ...]:
        """States after which the node must be deleted and created again ("" = it is gone)."""
        if self.queued:
            return ("", "FAILED", "SUSPENDING", "SUSPENDED", "DELETING")
        return ("", "PREEMPTED", "TERMINATED", "STOPPING", "STOPPED", "DELETING")

    def require_slice(self) -> Slice:
        if self.slice is None:
            raise ValueError("--accelerator is required for this subcommand")
        return self.slice


# ----------------------------------------------------------------------------- gcloud commands


def create_command(target: Target) -> list[str]:
    tpu = target.require_slice()
    version = target.version or tpu.runtime_version
    if target.queued:
        return [*GCLOUD_TPUS, "queued-resources", "create", target.name, f"--node-id={target.name}",
                *target.location, f"--accelerator-type={tpu.accelerator}", f"--runtime-version={version}", "--spot"]
    command = [*GCLOUD_TPUS, "tpu-vm", "create", target.name, *target.location,
               f"--accelerator-type={tpu.accelerator}", f"--version={version}"]
    return command + (["--preemptible"] if target.provisioning == "preemptible" else [])


def state_command(target: Target) -> list[str]:
    """Prints one word: the queued resource's state (ACTIVE, ...) or the node's (READY, ...)."""
    if target.queued:
        return [*GCLOUD_TPUS, "queued-resources", "describe", target.name, *target.location,
                "--format=value(state.state)"]
    return [*GCLOUD_TPUS, "tpu-vm", "describe", target.name, *target.location, "--format=value(state)"]


def delete_command(target: Target) -> list[str]:
    if target.queued:  # --force also deletes the node of an active queued resource
        return [*GCLOUD_TPUS, "queued-resources", "delete", target.name, *target.location, "--force", "--quiet"]
    return [*GCLOUD_TPUS, "tpu-vm", "delete", target.name, *target.location, "--quiet"]


def ssh_command(target: Target, command: str, worker: str = "all") -> list[str]:
    return [*GCLOUD_TPUS, "tpu-vm", "ssh", target.name, *target.location, f"--worker={worker}", f"--command={command}"]


def scp_command(target: Target, local: str, remote: str, worker: str = "all") -> list[str]:
    return [*GCLOUD_TPUS, "tpu-vm", "scp", local, f"{target.name}:{remote}", *target.location, f"--worker={worker}"]


def pack_command(source: str, tarball: str) -> list[str]:
    """A tarball of the checkout at `source` without VCS data, venvs, work directories or caches."""
    return ["tar", "-czf", tarball, "--exclude-vcs", *[f"--exclude={p}" for p in PACK_EXCLUDES], "-C", source, "."]


def local_tarball(target: Target) -> str:
    return f"/tmp/ldm_jax-{target.name}.tar.gz"


# ----------------------------------------------------------------------------- remote scripts


def tpu_jax_requirement(setup_py: str) -> str:
    """setup.py's `jax[cpu]<spec>` pin as `jax[tpu]<spec>` (the same jax, plus libtpu)."""
    match = re.search(r'"jax\[cpu\]([^"]*)"', setup_py)
    if not match:
        raise ValueError("setup.py has no \"jax[cpu]...\" requirement to derive the TPU install from")
    return f"jax[tpu]{match[1]}"


def install_script(jax_requirement: str) -> str:
    """Unpacks the copied tarball into ~/ldm_jax and installs it into ~/ldm_jax_venv."""
    pip = f"{REMOTE_VENV}/bin/pip"
    return "; ".join([
        "set -e",
        f"python3 -m venv {REMOTE_VENV} || {{ sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive "
        f"apt-get -qq install -y python3-venv && python3 -m venv --clear {REMOTE_VENV}; }}",
        f"rm -rf {REMOTE_SOURCE} && mkdir -p {REMOTE_SOURCE} && tar -xzf $HOME/{REMOTE_TARBALL} -C {REMOTE_SOURCE}",
        f"{pip} install -q --upgrade pip",
        f"{pip} install -q -e {REMOTE_SOURCE} {shlex.quote(jax_requirement)}",
    ])


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """`ldm-jax train --config=CONFIG --workdir=WORKDIR [extra...]` with `env` (KEY=VALUE) set."""

    config: str
    workdir: str
    extra: tuple[str, ...] = ()
    env: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.workdir.startswith(("/", REMOTE_WORKDIR)):
            raise ValueError(f"--workdir={self.workdir!r}: must be an absolute path on the workers (a shared mount "
                             f"that outlives the VM when it can be preempted) or a {REMOTE_WORKDIR}bucket/path URI")
        for item in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
                raise ValueError(f"--env={item!r}: expected KEY=VALUE")

    @property
    def model_marker(self) -> str:
        """Written by the train loop's export after the last step."""
        return f"{self.workdir.rstrip('/')}/model/model.json"


def train_invocation(job: TrainJob, tpu: Slice) -> str:
    """The `ldm-jax train` command line run on every worker (in ~/ldm_jax, with its venv)."""
    args = [f"--config={job.config}", f"--workdir={job.workdir}"]
    if tpu.hosts > 1:  # jax.distributed.initialize() finds the pod's coordinator, size and rank itself
        args.append("--config.distributed.auto=True")
    env = " ".join(shlex.quote(item) for item in ["PYTHONUNBUFFERED=1", *job.env])
    words = " ".join(shlex.quote(a) for a in [*args, *job.extra])
    return f"env {env} {REMOTE_VENV}/bin/ldm-jax train {words}"


def train_script(job: TrainJob, tpu: Slice, detach: bool = False) -> str:
    """Foreground: output streams back and is appended to the log, the exit status is training's
    (a dropped SSH session ends it at its next log line; `run` starts it again). Detached: under
    nohup, output only to the log, the SSH session returns at once."""
    invocation = train_invocation(job, tpu)
    if detach:
        return f"cd {REMOTE_SOURCE} && nohup {invocation} >> {TRAIN_LOG} 2>&1 < /dev/null &"
    return f"set -o pipefail; cd {REMOTE_SOURCE} && {invocation} 2>&1 | tee -a {TRAIN_LOG}"


def finished_script(job: TrainJob) -> str:
    """Exits 0 once the model is exported: `test -e` on a path; on a gs:// URI the installed
    project's storage layer (the client and credentials training writes with)."""
    if not job.workdir.startswith(REMOTE_WORKDIR):
        return f"test -e {shlex.quote(job.model_marker)}"
    check = "import sys; from ldm_jax import storage; sys.exit(not storage.path(sys.argv[1]).exists())"
    return f"{REMOTE_VENV}/bin/python -c {shlex.quote(check)} {shlex.quote(job.model_marker)}"


def logs_script(lines: int) -> str:
    return f"tail -n {int(lines)} -F {TRAIN_LOG}"


# ----------------------------------------------------------------------------- running


class Shell:
    """Runs commands, or (dry_run) prints each shell-quoted and assumes success.

    call(argv) -> exit status; output(argv, assume) -> stripped stdout (`assume` in a dry run; ""
    when the command fails, e.g. describing a resource that no longer exists)."""

    def __init__(self, dry_run: bool = False, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def _show(self, argv: Sequence[str]) -> None:
        print(shlex.join(argv), file=self.out, flush=True)

    def call(self, argv: Sequence[str]) -> int:
        self._show(argv)
        return 0 if self.dry_run else subprocess.call(list(argv))

    def output(self, argv: Sequence[str], assume: str = "") -> str:
        self._show(argv)
        if self.dry_run:
            return assume
        result = subprocess.run(list(argv), capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""


class LaunchError(RuntimeError):
    """A step failed on a healthy node (not a preemption), or the attempts ran out."""


def _check(status: int, what: str) -> None:
    if status != 0:
        raise LaunchError(f"{what} failed with exit status {status}")


@dataclasses.dataclass
class Steps:
    """One launch: what to install and train (job; None to install only), and how patiently to wait."""

    target: Target
    job: TrainJob | None
    source: str = str(ROOT)
    setup: str = ""
    detach: bool = False
    poll_seconds: float = 30.0
    ready_timeout_s: float = 24 * 3600.0  # queued spot capacity can take hours
    loss_grace_s: float = 300.0  # after training stops: how long the node may take to show a preemption

    def wait_ready(self, shell: Shell, sleep: Callable[[float], None]) -> bool:
        """Polls until the node is healthy (True) or lost (False); LaunchError on timeout."""
        for _ in range(max(1, math.ceil(self.ready_timeout_s / self.poll_seconds))):
            state = shell.output(state_command(self.target), assume=self.target.healthy_state)
            if state == self.target.healthy_state:
                return True
            if state in self.target.lost_states:
                return False
            sleep(self.poll_seconds)
        raise LaunchError(f"{self.target.name} was not {self.target.healthy_state} after {self.ready_timeout_s:.0f} s")

    def node_lost(self, shell: Shell, sleep: Callable[[float], None]) -> bool:
        """Whether the node is (or within loss_grace_s turns) preempted, suspended or gone."""
        for attempt in range(max(1, math.ceil(self.loss_grace_s / self.poll_seconds))):
            if attempt:
                sleep(self.poll_seconds)
            state = shell.output(state_command(self.target), assume=self.target.healthy_state)
            if state in self.target.lost_states:
                return True
        return False

    def pack(self, shell: Shell) -> None:
        _check(shell.call(pack_command(self.source, local_tarball(self.target))), "packing the checkout")

    def install(self, shell: Shell) -> int:
        """Copies the packed checkout to every worker and installs it; the first failing status."""
        requirement = tpu_jax_requirement((pathlib.Path(self.source) / "setup.py").read_text())
        commands = [
            scp_command(self.target, local_tarball(self.target), REMOTE_TARBALL),
            ssh_command(self.target, install_script(requirement)),
        ]
        if self.setup:
            commands.append(ssh_command(self.target, self.setup))
        for command in commands:
            status = shell.call(command)
            if status:
                return status
        return 0

    def train(self, shell: Shell) -> int:
        script = train_script(self.job, self.target.require_slice(), self.detach)
        return shell.call(ssh_command(self.target, script))

    def finished(self, shell: Shell) -> bool:
        return shell.call(ssh_command(self.target, finished_script(self.job), worker="0")) == 0


def run(steps: Steps, shell: Shell, *, max_attempts: int, keep: bool = False,
        sleep: Callable[[float], None] = time.sleep) -> int:
    """create -> install -> train until the model is exported; returns the attempts it took.

    After a stop: if the node is lost (preempted, suspended, gone) it is deleted and everything
    starts again (training resumes from the workdir's latest checkpoint); on a healthy node,
    training that stopped cleanly without exporting (SIGTERM) or lost its SSH session (255) is
    started again; any other failure raises LaunchError and leaves the node for inspection."""
    steps.pack(shell)
    need_node = True
    for attempt in range(1, max_attempts + 1):
        if need_node:
            _check(shell.call(create_command(steps.target)), f"creating {steps.target.name}")
            if not steps.wait_ready(shell, sleep):
                shell.call(delete_command(steps.target))
                continue
            status = steps.install(shell)
            if status:
                if steps.node_lost(shell, sleep):
                    shell.call(delete_command(steps.target))
                    continue
                raise LaunchError(f"installing on {steps.target.name} failed with exit status {status}")
            need_node = False
        status = steps.train(shell)
        if status == 0 and steps.finished(shell):
            if not keep:
                shell.call(delete_command(steps.target))
            return attempt
        if steps.node_lost(shell, sleep):
            print(f"[attempt {attempt}] {steps.target.name} was preempted: recreating it, training resumes "
                  "from the latest checkpoint", file=shell.out, flush=True)
            shell.call(delete_command(steps.target))
            need_node = True
        elif status not in (0, 255):
            raise LaunchError(f"ldm-jax train exited with status {status} on a healthy {steps.target.name}: not a "
                              f"preemption (see {TRAIN_LOG} on the workers)")
    raise LaunchError(f"training did not finish within {max_attempts} attempts")


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.tpu_vm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="subcommand", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM name (also the queued resource id)")
    common.add_argument("--zone", required=True)
    common.add_argument("--project", default="", help="default: gcloud's configured project")
    common.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    kind = argparse.ArgumentParser(add_help=False)
    mode = kind.add_mutually_exclusive_group()
    mode.add_argument("--spot", action="store_true", help="a Spot TPU through a queued resource")
    mode.add_argument("--preemptible", action="store_true", help="a (legacy) preemptible TPU VM")
    tpu = argparse.ArgumentParser(add_help=False)
    tpu.add_argument("--accelerator", required=True, help="v4-8, v4-32, v5litepod-8 (= v5e-8), v5p-64, v6e-8, ...")
    tpu.add_argument("--version", default="", help="runtime version (default: the generation's base image)")
    install = argparse.ArgumentParser(add_help=False)
    install.add_argument("--source", default=str(ROOT), help="the checkout to install (default: this one)")
    install.add_argument("--setup", default="", help="shell run on every worker after installing (e.g. a mount)")
    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--config", required=True, help="config file, relative to the repository root")
    train.add_argument("--workdir", required=True, help="gs://bucket/run, or an absolute path on the workers "
                       "(shared, persistent)")
    train.add_argument("--env", action="append", default=[], help="KEY=VALUE for the training processes")

    commands.add_parser("create", parents=[common, kind, tpu], help="create the TPU VM / queued resource")
    commands.add_parser("install", parents=[common, install], help="install the project on every worker")
    train_parser = commands.add_parser("train", parents=[common, tpu, train], help="ldm-jax train on all workers")
    train_parser.add_argument("--detach", action="store_true", help="run under nohup; follow with `logs`")
    logs = commands.add_parser("logs", parents=[common], help="follow the training log")
    logs.add_argument("--worker", default="0", help="worker index or 'all'")
    logs.add_argument("--lines", type=int, default=200)
    commands.add_parser("delete", parents=[common, kind], help="delete the TPU VM / queued resource")
    run_parser = commands.add_parser("run", parents=[common, kind, tpu, install, train],
                                     help="create, install, train (relaunching after preemption), delete")
    run_parser.add_argument("--max-attempts", type=int, default=0,
                            help="creations + restarts before giving up (default: 1 on demand, 100 spot/preemptible)")
    run_parser.add_argument("--poll-seconds", type=float, default=30.0)
    run_parser.add_argument("--keep", action="store_true", help="keep the TPU after training finished")
    return parser


def _target(args: argparse.Namespace) -> Target:
    provisioning = "spot" if getattr(args, "spot", False) else "preemptible" if getattr(args, "preemptible", False) else "on-demand"
    accelerator = getattr(args, "accelerator", None)
    return Target(args.name, args.zone, args.project, provisioning,
                  parse_slice(accelerator) if accelerator else None, getattr(args, "version", ""))


def main(argv: Sequence[str] | None = None, out=None) -> int:
    """argv: the arguments; those after `--` are passed on to `ldm-jax train`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if extra and args.subcommand not in ("train", "run"):
        parser.error(f"{args.subcommand}: arguments after -- are only for train and run")
    shell = Shell(args.dry_run, out)
    try:
        target = _target(args)
        if args.subcommand == "create":
            return shell.call(create_command(target))
        if args.subcommand == "delete":
            return shell.call(delete_command(target))
        if args.subcommand == "logs":
            return shell.call(ssh_command(target, logs_script(args.lines), worker=args.worker))
        job = TrainJob(args.config, args.workdir, tuple(extra), tuple(args.env)) if hasattr(args, "config") else None
        steps = Steps(target, job, source=getattr(args, "source", str(ROOT)), setup=getattr(args, "setup", ""),
                      detach=getattr(args, "detach", False), poll_seconds=getattr(args, "poll_seconds", 30.0))
        if args.subcommand == "install":
            steps.pack(shell)
            return steps.install(shell)
        if args.subcommand == "train":
            return steps.train(shell)
        attempts = args.max_attempts or (1 if target.provisioning == "on-demand" else 100)
        run(steps, shell, max_attempts=attempts, keep=args.keep)
        return 0
    except (ValueError, LaunchError) as error:
        print(f"launch.tpu_vm {args.subcommand}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
