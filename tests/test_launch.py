"""launch/: the exact gcloud commands of every TPU VM subcommand's dry run, the preemption relaunch
loop against a simulated gcloud, the SLURM / torchrun / explicit mappings of the multi-host
launcher (and the sbatch script under a stand-in srun), the real-run configs, and
docs/capacity.md against launch/capacity.py."""
import importlib.metadata
import io
import os
import shlex
import subprocess
import sys
import time

import flax.linen as nn
import jax
import pytest
from packaging.requirements import Requirement

from subprocesses import ROOT, load_config_module

if str(ROOT) not in sys.path:  # launch/ is not an installed package; it runs from the repository root
    sys.path.insert(0, str(ROOT))

from launch import capacity, multinode, tpu_vm  # noqa: E402
from ldm_jax import storage  # noqa: E402
from ldm_jax.data import pipeline  # noqa: E402
from ldm_jax.diffusion import objectives  # noqa: E402
from ldm_jax.models import backbones  # noqa: E402
from ldm_jax.models.discriminator import NLayerDiscriminator  # noqa: E402
from ldm_jax.models.dit import dit_preset  # noqa: E402
from ldm_jax.models.vae import SD_VAE_CONFIG, AutoencoderKL  # noqa: E402
from ldm_jax.parallel import mesh as mesh_lib  # noqa: E402
from ldm_jax.training import optimizers, vae_losses  # noqa: E402

TPUS = ["gcloud", "compute", "tpus"]
VM = TPUS + ["tpu-vm"]
QR = TPUS + ["queued-resources"]
SRC, VENV, LOG = "$HOME/ldm_jax", "$HOME/ldm_jax_venv", "$HOME/ldm_jax_train.log"


def dry_run(subcommand, *argv):
    """The commands `python -m launch.tpu_vm SUBCOMMAND --dry-run ARGV` prints, each split back into argv."""
    out = io.StringIO()
    assert tpu_vm.main([subcommand, "--dry-run", *argv], out=out) == 0
    return [shlex.split(line) for line in out.getvalue().splitlines()]


def train_line(job_args, multi_host, env=()):
    auto = " --config.distributed.auto=True" if multi_host else ""
    return (f"env PYTHONUNBUFFERED=1{''.join(' ' + e for e in env)} {VENV}/bin/ldm-jax train "
            f"--config=configs/dit_xl2_imagenet256.py --workdir=/mnt/runs/dit{auto}{job_args}")


# ----------------------------------------------------------------------------- slices


@pytest.mark.parametrize("name, accelerator, generation, chips, hosts, runtime", [
    ("v4-8", "v4-8", "v4", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-32", "v4-32", "v4", 16, 4, "tpu-ubuntu2204-base"),
    ("v5e-8", "v5litepod-8", "v5e", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", "v5litepod-16", "v5e", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v5p-64", "v5p", 32, 8, "v2-alpha-tpuv5"),
    ("v6e-8", "v6e-8", "v6e", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-256", "v6e-256", "v6e", 256, 64, "v2-alpha-tpuv6e"),
])
def test_parse_slice(name, accelerator, generation, chips, hosts, runtime):
    assert tpu_vm.parse_slice(name) == tpu_vm.Slice(accelerator, generation, chips, hosts, runtime)


@pytest.mark.parametrize("name", ["v4-12", "v4-4", "v5e-2", "v6e-512", "v3-8", "v4"])
def test_parse_slice_rejects(name):
    with pytest.raises(ValueError, match="--accelerator"):
        tpu_vm.parse_slice(name)


# ----------------------------------------------------------------------------- dry runs


@pytest.mark.parametrize("flags, expected", [
    (["--accelerator=v5e-8"],
     VM + ["create", "t", "--zone=us-west4-a", "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]),
    (["--accelerator=v4-8", "--preemptible", "--project=p1", "--version=tpu-vm-base"],
     VM + ["create", "t", "--zone=us-west4-a", "--project=p1", "--accelerator-type=v4-8", "--version=tpu-vm-base",
           "--preemptible"]),
    (["--accelerator=v4-32", "--spot"],
     QR + ["create", "t", "--node-id=t", "--zone=us-west4-a", "--accelerator-type=v4-32",
           "--runtime-version=tpu-ubuntu2204-base", "--spot"]),
    (["--accelerator=v5p-64", "--spot"],
     QR + ["create", "t", "--node-id=t", "--zone=us-west4-a", "--accelerator-type=v5p-64",
           "--runtime-version=v2-alpha-tpuv5", "--spot"]),
])
def test_create(flags, expected):
    assert dry_run("create", "--name=t", "--zone=us-west4-a", *flags) == [expected]


@pytest.mark.parametrize("flags, expected", [
    ([], VM + ["delete", "t", "--zone=z", "--quiet"]),
    (["--spot"], QR + ["delete", "t", "--zone=z", "--force", "--quiet"]),
])
def test_delete(flags, expected):
    assert dry_run("delete", "--name=t", "--zone=z", *flags) == [expected]


def test_logs():
    assert dry_run("logs", "--name=t", "--zone=z") == [
        VM + ["ssh", "t", "--zone=z", "--worker=0", f"--command=tail -n 200 -F {LOG}"]]
    assert dry_run("logs", "--name=t", "--zone=z", "--worker=all", "--lines=5") == [
        VM + ["ssh", "t", "--zone=z", "--worker=all", f"--command=tail -n 5 -F {LOG}"]]


def test_install(tmp_path):
    """Packs the given checkout, copies it to every worker, installs it with setup.py's jax pin as
    jax[tpu], then runs --setup everywhere."""
    (tmp_path / "setup.py").write_text('INSTALL_REQUIRES = ["jax[cpu]>=9.1,<9.2", "flax"]\n')
    commands = dry_run("install", "--name=t", "--zone=z", f"--source={tmp_path}", "--setup=sudo mount /mnt/runs")
    install = (f"set -e; python3 -m venv {VENV} || {{ sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive "
               f"apt-get -qq install -y python3-venv && python3 -m venv --clear {VENV}; }}; rm -rf {SRC} && mkdir -p "
               f"{SRC} && tar -xzf $HOME/ldm_jax_src.tar.gz -C {SRC}; {VENV}/bin/pip install -q --upgrade pip; "
               f"{VENV}/bin/pip install -q -e {SRC} 'jax[tpu]>=9.1,<9.2'")
    assert commands == [
        ["tar", "-czf", "/tmp/ldm_jax-t.tar.gz", "--exclude-vcs", "--exclude=.venv", "--exclude=workdir",
         "--exclude=__pycache__", "--exclude=*.egg-info", "--exclude=.pytest_cache", "-C", str(tmp_path), "."],
        VM + ["scp", "/tmp/ldm_jax-t.tar.gz", "t:ldm_jax_src.tar.gz", "--zone=z", "--worker=all"],
        VM + ["ssh", "t", "--zone=z", "--worker=all", f"--command={install}"],
        VM + ["ssh", "t", "--zone=z", "--worker=all", "--command=sudo mount /mnt/runs"],
    ]


def test_tpu_jax_requirement_follows_setup_py():
    """The TPU install pins the same jax as the package (its installed metadata), with libtpu."""
    ours = Requirement(tpu_vm.tpu_jax_requirement((ROOT / "setup.py").read_text()))
    pinned = next(Requirement(r) for r in importlib.metadata.requires("ldm_jax") if r.startswith("jax["))
    assert (ours.name, ours.extras, ours.specifier) == (pinned.name, {"tpu"}, pinned.specifier)


@pytest.mark.parametrize("accelerator, multi_host", [("v4-8", False), ("v5e-8", False), ("v4-32", True), ("v5p-64", True)])
def test_train(accelerator, multi_host):
    """All workers at once; a pod slice adds distributed.auto; extra flags and --env are quoted."""
    commands = dry_run("train", "--name=t", "--zone=z", f"--accelerator={accelerator}",
                       "--config=configs/dit_xl2_imagenet256.py", "--workdir=/mnt/runs/dit",
                       "--env=LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "--",
                       "--config.data.path=/mnt/my latents", "--config.train.num_steps=400000")
    line = train_line(" '--config.data.path=/mnt/my latents' --config.train.num_steps=400000", multi_host,
                      env=["'LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2'"])
    assert commands == [VM + ["ssh", "t", "--zone=z", "--worker=all", f"--command=set -o pipefail; cd {SRC} && {line} 2>&1 | tee -a {LOG}"]]


def test_train_detached():
    commands = dry_run("train", "--name=t", "--zone=z", "--accelerator=v4-32", "--detach",
                       "--config=configs/dit_xl2_imagenet256.py", "--workdir=/mnt/runs/dit")
    line = train_line("", multi_host=True)
    assert commands == [VM + ["ssh", "t", "--zone=z", "--worker=all", f"--command=cd {SRC} && nohup {line} >> {LOG} 2>&1 < /dev/null &"]]


def test_run_spot_dry_run():
    """The whole sequence (the dry run assumes every step succeeds and the queued resource is ACTIVE)."""
    commands = dry_run("run", "--name=t", "--zone=z", "--project=p", "--accelerator=v5p-64", "--spot",
                       "--config=configs/dit_xl2_imagenet256.py", "--workdir=/mnt/runs/dit", "--setup=mount-it")
    where = ["--zone=z", "--project=p"]
    assert commands[0][:3] == ["tar", "-czf", "/tmp/ldm_jax-t.tar.gz"]
    assert commands[1] == QR + ["create", "t", "--node-id=t", *where, "--accelerator-type=v5p-64",
                                "--runtime-version=v2-alpha-tpuv5", "--spot"]
    assert commands[2] == QR + ["describe", "t", *where, "--format=value(state.state)"]
    assert commands[3] == VM + ["scp", "/tmp/ldm_jax-t.tar.gz", "t:ldm_jax_src.tar.gz", *where, "--worker=all"]
    assert commands[4][:-1] == VM + ["ssh", "t", *where, "--worker=all"] and "pip install" in commands[4][-1]
    assert commands[5:] == [
        VM + ["ssh", "t", *where, "--worker=all", "--command=mount-it"],
        VM + ["ssh", "t", *where, "--worker=all", f"--command=set -o pipefail; cd {SRC} && {train_line('', True)} 2>&1 | tee -a {LOG}"],
        VM + ["ssh", "t", *where, "--worker=0", "--command=test -e /mnt/runs/dit/model/model.json"],
        QR + ["delete", "t", *where, "--force", "--quiet"],
    ]


def test_run_with_a_gcs_workdir(gcs, tmp_path):
    """A gs:// workdir needs no mount: training gets the URI, and the finished check (run for real
    here, against the GCS emulator, by a stand-in for the workers' venv python) reads the bucket
    through the project's storage layer."""
    workdir = gcs.uri("launch", "dit")
    commands = dry_run("run", "--name=t", "--zone=z", "--accelerator=v4-8", "--config=c.py", f"--workdir={workdir}")
    assert [c for c in commands if "ldm-jax train" in c[-1]][0][-1].endswith(f"--config=c.py --workdir={workdir} 2>&1 | tee -a {LOG}")
    finished = tpu_vm.finished_script(tpu_vm.TrainJob("c.py", workdir))
    assert VM + ["ssh", "t", "--zone=z", "--worker=0", f"--command={finished}"] in commands
    python = tmp_path / "ldm_jax_venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)

    def check():
        return subprocess.run(["bash", "-c", finished], cwd=tmp_path, env=dict(os.environ, HOME=str(tmp_path)),
                              capture_output=True, text=True, timeout=120)

    before = check()
    assert before.returncode == 1 and "Traceback" not in before.stderr, before.stderr[-2000:]
    storage.path(f"{workdir}/model/model.json").write_text("{}")
    after = check()
    assert after.returncode == 0, after.stderr[-2000:]
    assert not (tmp_path / "gs:").exists() and not (ROOT / "gs:").exists()


def test_remote_scripts_run_under_bash(tmp_path):
    """The worker-side scripts parse, and the training script runs (with a stand-in for the
    installed `ldm-jax` in a scratch $HOME): its output streams back and into the log, and its exit
    status is training's, also when detached under nohup."""
    for script in [tpu_vm.install_script("jax[tpu]>=1,<2"), tpu_vm.logs_script(10),
                   tpu_vm.finished_script(tpu_vm.TrainJob("c.py", "/a b"))]:
        assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0, script
    (tmp_path / "ldm_jax").mkdir()
    stub = tmp_path / "ldm_jax_venv" / "bin" / "ldm-jax"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\necho "$(pwd) $PYTHONUNBUFFERED $XLA_X: $*"\nexit "$STATUS"\n')
    stub.chmod(0o755)
    job = tpu_vm.TrainJob("configs/x.py", "/runs/a b", extra=("--config.seed=1",), env=("XLA_X=1 2",))
    env = dict(os.environ, HOME=str(tmp_path), STATUS="3")
    expected = f"{tmp_path / 'ldm_jax'} 1 1 2: train --config=configs/x.py --workdir=/runs/a b --config.distributed.auto=True --config.seed=1\n"
    foreground = subprocess.run(["bash", "-c", tpu_vm.train_script(job, tpu_vm.parse_slice("v4-32"))],
                                env=env, capture_output=True, text=True, timeout=60)
    assert (foreground.returncode, foreground.stdout) == (3, expected)
    log = tmp_path / "ldm_jax_train.log"
    assert log.read_text() == expected
    detached = subprocess.run(["bash", "-c", tpu_vm.train_script(job, tpu_vm.parse_slice("v4-32"), detach=True)],
                              env=env, capture_output=True, text=True, timeout=60)
    assert (detached.returncode, detached.stdout) == (0, "")
    for _ in range(500):
        if log.read_text() == expected * 2:
            break
        time.sleep(0.01)
    assert log.read_text() == expected * 2


def test_cli_runs_as_a_module_and_reports_user_errors():
    ok = subprocess.run([sys.executable, "-m", "launch.tpu_vm", "delete", "--name=t", "--zone=z", "--dry-run"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, "gcloud compute tpus tpu-vm delete t --zone=z --quiet\n")
    bad = subprocess.run([sys.executable, "-m", "launch.tpu_vm", "train", "--name=t", "--zone=z", "--accelerator=v4-32",
                          "--config=c.py", "--workdir=relative/dir", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "--workdir='relative/dir': must be an absolute path" in bad.stderr


# ----------------------------------------------------------------------------- relaunch loop


class SimulatedCloud:
    """Stands in for gcloud and the TPU service (the part of the world `run` talks to).

    A queued resource waits in the queue for two polls, then is ACTIVE. Each of the first
    `preemptions` trainings is preempted: SIGTERM makes `ldm-jax train` save and exit 0, and the
    resource shows SUSPENDED one poll later. A later training exports the model. `failing` makes
    training exit 1 on a healthy node; `ssh_drops` makes the first trainings lose their SSH session."""

    def __init__(self, preemptions=0, failing=False, ssh_drops=0, queue_failures=0):
        self.state = None
        self.preemptions, self.failing, self.ssh_drops, self.queue_failures = preemptions, failing, ssh_drops, queue_failures
        self.exported = False
        self.log = []  # (kind, extra)
        self.out = io.StringIO()
        self.pending = []  # states the next describes report, in order

    def call(self, argv):
        if argv[0] == "tar":  # packing the checkout happens locally
            return 0
        kind = " ".join(argv[3:5])
        if kind == "queued-resources create":
            assert self.state is None, "created while it exists"
            failed = self.queue_failures > 0
            self.queue_failures -= failed
            self.state, self.pending = "ACTIVE", ["WAITING_FOR_RESOURCES", "PROVISIONING" if not failed else "FAILED"]
            self.log.append(("create", None))
            return 0
        if kind == "queued-resources delete":
            self.state, self.pending = None, []
            self.log.append(("delete", None))
            return 0
        if self.state != "ACTIVE" or self.pending:
            return 255
        command = argv[-1]
        if "ldm-jax train" in command:
            self.log.append(("train", command))
            if self.ssh_drops:
                self.ssh_drops -= 1
                return 255
            if self.preemptions:
                self.preemptions -= 1
                self.pending = ["ACTIVE", "SUSPENDED"]
                return 0
            if self.failing:
                return 1
            self.exported = True
            return 0
        if command.startswith("--command=test -e"):
            return 0 if self.exported else 1
        self.log.append(("install" if "pip install" in command else "scp" if kind == "tpu-vm scp" else "ssh", None))
        return 0

    def output(self, argv, assume=""):
        assert " ".join(argv[3:5]) == "queued-resources describe"
        if self.pending:
            state = self.pending.pop(0)
            if state in ("SUSPENDED", "FAILED"):
                self.state, self.pending = state, []
            return state
        return self.state or ""


def _run(cloud, max_attempts=5):
    target = tpu_vm.Target("t", "z", provisioning="spot", slice=tpu_vm.parse_slice("v4-32"))
    job = tpu_vm.TrainJob("configs/dit_xl2_imagenet256.py", "/mnt/runs/dit")
    steps = tpu_vm.Steps(target, job, poll_seconds=30.0, ready_timeout_s=600.0, loss_grace_s=90.0)
    sleeps = []
    attempts = tpu_vm.run(steps, cloud, max_attempts=max_attempts, sleep=sleeps.append)
    return attempts, sleeps


def test_run_relaunches_after_preemption_and_resumes():
    cloud = SimulatedCloud(preemptions=2)
    attempts, sleeps = _run(cloud)
    kinds = [kind for kind, _ in cloud.log]
    assert attempts == 3
    assert kinds == ["create", "scp", "install", "train", "delete"] * 2 + ["create", "scp", "install", "train", "delete"]
    trains = [extra for kind, extra in cloud.log if kind == "train"]
    assert len(set(trains)) == 1  # the same command each time: the run resumes from the workdir
    assert cloud.exported and cloud.state is None  # finished, then deleted
    assert sleeps == [30.0] * (3 * 2 + 2 * 1)  # two queue polls per creation, one grace poll per preemption


def test_run_recreates_a_queued_resource_that_failed():
    cloud = SimulatedCloud(queue_failures=1)
    attempts, _ = _run(cloud)
    assert attempts == 2
    assert [kind for kind, _ in cloud.log] == ["create", "delete", "create", "scp", "install", "train", "delete"]


def test_run_retrains_on_the_same_node_after_a_dropped_ssh_session():
    cloud = SimulatedCloud(ssh_drops=1)
    attempts, sleeps = _run(cloud)
    assert attempts == 2
    assert [kind for kind, _ in cloud.log] == ["create", "scp", "install", "train", "train", "delete"]
    assert sleeps == [30.0] * (2 + 2)  # the queue, then the full grace period: the node stayed healthy


def test_run_stops_on_a_training_failure_and_keeps_the_node():
    cloud = SimulatedCloud(failing=True)
    with pytest.raises(tpu_vm.LaunchError, match="exited with status 1 on a healthy t: not a preemption"):
        _run(cloud)
    assert [kind for kind, _ in cloud.log] == ["create", "scp", "install", "train"]
    assert cloud.state == "ACTIVE"


def test_run_gives_up_after_max_attempts():
    cloud = SimulatedCloud(preemptions=10)
    with pytest.raises(tpu_vm.LaunchError, match="did not finish within 2 attempts"):
        _run(cloud, max_attempts=2)
    assert [kind for kind, _ in cloud.log].count("train") == 2


# ----------------------------------------------------------------------------- multi-host GPU


@pytest.mark.parametrize("spec, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07],gpu-a", ["node01", "node02", "node03", "node07", "gpu-a"]),
    ("a[9-11]", ["a9", "a10", "a11"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("x-[001],y", ["x-001", "y"]),
])
def test_expand_hostlist(spec, hosts):
    assert multinode.expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["node[01-", "node]1[", "node[3-1]", "node[a-b]", ""])
def test_expand_hostlist_rejects(spec):
    with pytest.raises(ValueError, match="host list"):
        multinode.expand_hostlist(spec)


SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "other[1-9]",
         "SLURM_JOB_ID": "123456", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}


def test_slurm_env():
    # The port is JAX's choice for SLURM jobs: 123456 mod 4096 + 61440.
    assert multinode.slurm_env(SLURM) == {
        "LDM_JAX_COORDINATOR": "gpu07:62016", "LDM_JAX_NUM_PROCESSES": "4", "LDM_JAX_PROCESS_ID": "3"}
    batch_script = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert multinode.slurm_env(batch_script, port=9999)["LDM_JAX_COORDINATOR"] == "other1:9999"


def test_slurm_env_agrees_with_jax_detection(monkeypatch):
    """Where JAX's own SLURM detection applies, it picks the same coordinator, count and rank."""
    from jax._src.clusters.slurm_cluster import SlurmCluster

    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    ours = multinode.slurm_env(SLURM)
    assert ours == {"LDM_JAX_COORDINATOR": SlurmCluster.get_coordinator_address(None, None),
                    "LDM_JAX_NUM_PROCESSES": str(SlurmCluster.get_process_count()),
                    "LDM_JAX_PROCESS_ID": str(SlurmCluster.get_process_id())}


@pytest.mark.parametrize("change, message", [
    ({"SLURM_PROCID": None}, "SLURM_PROCID not set"),
    ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, "SLURM_STEP_NODELIST, SLURM_JOB_NODELIST"),
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x4)"}, "8 processes per node"),
    ({"SLURM_PROCID": "4"}, "need 0 <= process_id < num_processes"),
])
def test_slurm_env_errors(change, message):
    environ = {k: v for k, v in {**SLURM, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        multinode.slurm_env(environ)


def test_torchrun_env():
    environ = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "8", "RANK": "5", "LOCAL_WORLD_SIZE": "1"}
    assert multinode.torchrun_env(environ) == {
        "LDM_JAX_COORDINATOR": "10.0.0.1:29500", "LDM_JAX_NUM_PROCESSES": "8", "LDM_JAX_PROCESS_ID": "5"}
    assert multinode.torchrun_env(environ, port=29501)["LDM_JAX_COORDINATOR"] == "10.0.0.1:29501"
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE says 8 processes per node"):
        multinode.torchrun_env({**environ, "LOCAL_WORLD_SIZE": "8"})
    with pytest.raises(ValueError, match="RANK not set"):
        multinode.torchrun_env({k: v for k, v in environ.items() if k != "RANK"})


def test_multinode_dry_run(capsys):
    args = ["--", "train", "--config=configs/dit_xl2_imagenet256.py", "--workdir=/shared/run a"]
    assert multinode.main(["--coordinator=node0:12355", "--num_processes=2", "--process_id=1", "--dry-run", *args], environ={}) == 0
    assert multinode.main(["--from=slurm", "--dry-run", *args], environ=SLURM) == 0
    assert multinode.main(["--coordinator=node0:12355", "--num_processes=2", "--process_id=2", *args], environ={}) == 1
    out, err = capsys.readouterr()
    command = f"{shlex.quote(sys.executable)} -m ldm_jax.cli train --config=configs/dit_xl2_imagenet256.py '--workdir=/shared/run a'"
    assert out.splitlines() == [
        f"env LDM_JAX_COORDINATOR=node0:12355 LDM_JAX_NUM_PROCESSES=2 LDM_JAX_PROCESS_ID=1 {command}",
        f"env LDM_JAX_COORDINATOR=gpu07:62016 LDM_JAX_NUM_PROCESSES=4 LDM_JAX_PROCESS_ID=3 {command}",
    ]
    assert "need 0 <= process_id < num_processes" in err


def test_multinode_execs_ldm_jax():
    result = subprocess.run([sys.executable, "-m", "launch.multinode", "--coordinator=127.0.0.1:1234", "--num_processes=1",
                             "--process_id=0", "--", "no-such-command"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "process 0 of 1, coordinator 127.0.0.1:1234" in result.stderr
    assert "got ['no-such-command']" in result.stderr  # ldm_jax.cli ran and refused the command


def test_slurm_sbatch_script(tmp_path):
    """The sbatch script under a stand-in `srun` (runs its command once, here as task 1 of 2)."""
    srun = tmp_path / "srun"
    srun.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/srun_args"\n'
                    'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{tmp_path}:{env['PATH']}", PYTHON=sys.executable, LAUNCH_FLAGS="--dry-run",
               SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[3-4]", SLURM_JOB_ID="42")
    script = ["bash", "launch/slurm_train.sbatch"]
    result = subprocess.run([*script, "configs/dit_xl2_imagenet256.py", "/shared/w", "--config.train.num_steps=10"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"env LDM_JAX_COORDINATOR=node3:61482 LDM_JAX_NUM_PROCESSES=2 LDM_JAX_PROCESS_ID=1 "
                             f"{shlex.quote(sys.executable)} -m ldm_jax.cli train --config=configs/dit_xl2_imagenet256.py "
                             "--workdir=/shared/w --config.train.num_steps=10\n")
    assert (tmp_path / "srun_args").read_text().split()[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    usage = subprocess.run([*script, "configs/dit_xl2_imagenet256.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert usage.returncode != 0 and "usage: sbatch launch/slurm_train.sbatch CONFIG WORKDIR" in usage.stderr


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["dit_xl2_imagenet256", "vae_imagenet256", "t2i_xl2_256"])
def test_config_fits_the_slice_its_docstring_names(name):
    module = load_config_module(name)
    config = module.get_config()
    pipeline.resolve_config(config.data)  # unknown data fields or values raise
    optimizers.make_optimizer(config.optimizer)
    tpu = tpu_vm.parse_slice(tpu_vm.ACCELERATOR_PATTERN.search(module.__doc__.split("\n\n")[0])[0])
    shape = dict(zip(("data", "fsdp", "tensor"), mesh_lib.mesh_shape(dict(config.mesh), tpu.chips)))
    batch = config.data.batch_size
    assert batch % (shape["data"] * shape["fsdp"]) == 0 and batch % tpu.hosts == 0
    assert config.train.peak_tflops_per_device == capacity.CHIPS[tpu.generation].peak_tflops


def test_dit_xl2_config_is_the_paper_recipe():
    config = load_config_module("dit_xl2_imagenet256").get_config()
    model = backbones.backbone_from_config(config.model)
    reference = dit_preset("DiT-XL/2", input_size=32, dtype="bfloat16")
    assert model == reference and model.learn_sigma and model.class_dropout_prob == 0.1
    objective = objectives.objective_from_config(config.diffusion, learn_sigma=model.learn_sigma)
    sampler = objectives.sampler_from_config(config.sample, objective)
    assert (sampler.sampler, sampler.num_steps, sampler.spacing, sampler.variance) == ("ddpm", 250, "linspace", "learned_range")
    assert (config.sample.guidance_scale, config.sample.guided_channels) == (1.5, 3)
    assert (config.data.source, config.data.batch_size, config.data.random_flip, config.data.latent_norm) == (
        "latents", 256, True, "vae")
    assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.weight_decay,
            config.optimizer.schedule) == ("adamw", 1e-4, 0.0, "constant")
    assert (config.ema.decay, config.ema.warmup, config.train.num_steps) == (0.9999, False, 7_000_000)


def test_t2i_config_is_a_text_conditioned_xl2():
    config = load_config_module("t2i_xl2_256").get_config()
    model = backbones.backbone_from_config(config.model)
    assert (model.hidden_size, model.depth, model.patch_size, model.adaln, model.num_classes) == (1152, 28, 2, "single", 0)
    assert sorted(model.condition_fields()) == ["context", "context_mask"] and model.context_dim == 768
    assert config.text.encoder_path and config.text.tokenizer_path and config.sample.prompts


def test_vae_config_is_the_sd_f8_architecture():
    config = load_config_module("vae_imagenet256").get_config()
    vae = backbones.module_from_config(AutoencoderKL, config.model, "model")
    assert vae.to_config() == dict(SD_VAE_CONFIG) and vae.downsample_factor == 8
    assert (vae.dtype, vae.remat) == ("bfloat16", True)
    loss = dict(config.vae_loss)
    discriminator = backbones.module_from_config(NLayerDiscriminator, loss.pop("discriminator"), "vae_loss.discriminator")
    for field in ("lpips_vgg_path", "lpips_lins_path"):
        assert loss.pop(field).startswith("weights/")
    recipe = vae_losses.VAELoss(discriminator=discriminator, **loss)
    assert (recipe.kl_weight, recipe.disc_start, recipe.disc_weight, recipe.disc_loss) == (1e-6, 50_001, 0.5, "hinge")
    assert (config.optimizer.name, config.optimizer.b1, config.optimizer.b2) == ("adam", 0.5, 0.9)


# ----------------------------------------------------------------------------- capacity


def test_capacity_doc_matches_the_script():
    text = (ROOT / "docs" / "capacity.md").read_text()
    begin, end = "<!-- launch/capacity.py output: begin -->\n", "<!-- launch/capacity.py output: end -->"
    assert text[text.index(begin) + len(begin): text.index(end)] == capacity.render()


def test_forward_flop_formula_matches_xla():
    """On a small DiT too (other width, heads, patch size than the table's XL/2)."""
    model = dit_preset("DiT-S/8", input_size=32)
    boxed = capacity.boxed_params(model)
    formula = capacity.forward_flops(model, *capacity.matmul_params(boxed))
    assert abs(capacity.xla_forward_flops(model, nn.unbox(boxed)) / formula - 1) < 0.01


def test_params_per_chip_follows_the_layout():
    boxed = capacity.boxed_params(dit_preset("DiT-S/8", input_size=32))
    total = sum(leaf.size for leaf in jax.tree.leaves(nn.unbox(boxed)))
    assert capacity.params_per_chip(boxed, dict(data=-1), 16) == total
    fsdp = capacity.params_per_chip(boxed, dict(fsdp=-1), 16)
    assert total / 16 <= fsdp < total / 8  # a few bias vectors and the timestep MLP's input stay unsharded
