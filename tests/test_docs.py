"""Every command in README.md and docs/*.md is run or checked, so the docs cannot drift.

Fenced blocks are read by their info string (```` ```LANG WORDS ````):

- ```` ```bash runnable ```` / ```` ```python runnable ````: run as written (bash -e -o pipefail, or
  python) in a sandbox, and must exit 0, or N with ```` runnable exit=N ```` (a documented error).
  A ```` ```text output ```` block right after it lists lines the run must print (stdout or
  stderr); `...` in a line stands for anything. Runnable commands are the cheap ones: sampling a
  small model, dry runs of the launchers, the documented errors, a flow traced with eval_shape.
- Every other bash block is checked without running it. Each command (backslash continuations
  joined, comments dropped, split at `&&`, `||`, `;`, `|`, leading VAR=value assignments dropped):
  `ldm-jax CMD ...` or `python -m ldm_jax.cli CMD ...`: CMD is a command and its flags parse as the
  CLI parses them (config files exist, every --config.a.b override names a field, values parse);
  `python -m launch.tpu_vm|multinode ...`: runs with --dry-run, and the `ldm-jax train` arguments
  it passes on (its --config and the arguments after `--`) are flag-checked too; anything else
  (pip, gcloud, wget, tensorboard, ...) is not checked.
- Every other python block is compiled, and its imports of ldm_jax and launch are executed.

The sandbox is a temporary directory where configs/ and launch/ link to the checkout, `ldm-jax` and
`python` are this interpreter's (one CPU device), and workdir/dit_digits/model holds a DiT bundle of
configs/dit_digits.py's architecture, made smaller, with random weights (tests/bundles.py): what
`ldm-jax train --config=configs/dit_digits.py --workdir=workdir/dit_digits` exports, untrained.
"""
import ast
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import bundles
from subprocesses import ROOT, cpu_env, load_config

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
INFO_WORDS = re.compile(r"runnable|output|exit=\d+")
SEPARATORS = {"&&", "||", ";", "|"}
LAUNCHERS = ("launch.tpu_vm", "launch.multinode")
# Flag-checks argv lists in one process: each parse runs in a fork of it, so every command meets the
# CLI's flags fresh (absl and ml_collections keep parsed state), without an interpreter start each.
FLAG_CHECKER = r"""
import json, os, sys
from ldm_jax import cli, config  # imported once, before the forks

results = []
for argv in json.load(sys.stdin):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        problem = ""
        if argv[1] not in cli.COMMANDS:
            problem = f"{argv[1]!r} is not a command; commands: {cli.COMMANDS}"
        else:
            sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv
            try:
                left = cli._parse_flags(argv)
                if left[1:] != [argv[1]]:
                    problem = f"arguments that are not flags: {left[2:]}"
            except SystemExit as error:
                problem = str(error)
        os.write(write, problem.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        results.append(f.read())
    os.waitpid(pid, 0)
print(json.dumps(results))
"""


@dataclasses.dataclass
class Block:
    where: str  # file:line of the opening fence
    lang: str
    words: tuple[str, ...]
    text: str
    expected: str = ""  # the ```text output``` block after a runnable one

    @property
    def exit_code(self) -> int:
        return next((int(w.split("=")[1]) for w in self.words if w.startswith("exit=")), 0)


def read_blocks(path):
    """The fenced blocks of a markdown file (also indented ones, as in list items), output blocks
    attached to the runnable block before them."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            indent = len(lines[i]) - len(lines[i].lstrip())
            lang, *words = lines[i].lstrip()[3:].split() or [""]
            end = next(j for j in range(i + 1, len(lines)) if lines[j].lstrip().startswith("```"))
            unknown = [w for w in words if not INFO_WORDS.fullmatch(w)]
            assert not unknown, f"{path.name}:{i + 1}: unknown fence words {unknown}"
            text = "\n".join(line[indent:] for line in lines[i + 1:end])
            blocks.append(Block(f"{path.relative_to(ROOT)}:{i + 1}", lang, tuple(words), text))
            i = end
        i += 1
    for block, after in zip(blocks, blocks[1:]):
        if "output" in after.words:
            assert "runnable" in block.words, f"{after.where}: an output block follows a block that is not run"
            block.expected = after.text
    return [block for block in blocks if "output" not in block.words]


def shell_commands(text):
    """A bash block -> its commands as argv lists (see the module docstring)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        command = []
        for token in shlex.split(line, comments=True) + [";"]:
            if token in SEPARATORS:
                while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                    command.pop(0)
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(token)
    return commands


def cli_argv(command):
    """`ldm-jax ...` or `python -m ldm_jax.cli ...` -> ["ldm-jax", ...]; else None."""
    if command[0] == "ldm-jax":
        return command
    if command[0].startswith("python") and command[1:3] == ["-m", "ldm_jax.cli"]:
        return ["ldm-jax", *command[3:]]
    return None


def launcher_checks(command):
    """`python -m launch.X ARGS [-- MORE]` -> (its dry-run argv, the ldm-jax argv it passes on); else None."""
    if not (command[0].startswith("python") and len(command) > 2 and command[1:3] in [["-m", m] for m in LAUNCHERS]):
        return None
    args = command[3:]
    before, after = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
    dry_run = [sys.executable, "-m", command[2], *before, "--dry-run", *(["--", *after] if "--" in args else [])]
    if command[2] == "launch.multinode":
        return dry_run, ["ldm-jax", *after]
    config = [a for a in before if a.startswith("--config=")]
    return dry_run, (["ldm-jax", "train", *config, *after] if config else None)


BLOCKS = [block for path in DOCS for block in read_blocks(path)]
RUNNABLE = [block for block in BLOCKS if "runnable" in block.words]
CHECKED = [block for block in BLOCKS if "runnable" not in block.words]
CLI_COMMANDS, DRY_RUNS = [], []
for block in CHECKED:
    if block.lang in ("bash", "sh"):
        for command in shell_commands(block.text):
            launcher = launcher_checks(command)
            if launcher:
                DRY_RUNS.append((block.where, launcher[0]))
            argv = cli_argv(command) or (launcher and launcher[1])
            if argv:
                CLI_COMMANDS.append((block.where, argv))
PYTHON_BLOCKS = [block for block in CHECKED if block.lang == "python"]


def test_the_docs_run_and_check_commands():
    assert DOCS[0].name == "README.md" and len(DOCS) > 1
    assert len(RUNNABLE) >= 5 and len(CLI_COMMANDS) >= 10 and DRY_RUNS and PYTHON_BLOCKS


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """(directory, environment) the runnable blocks run in (see the module docstring)."""
    root = tmp_path_factory.mktemp("sandbox")
    for name in ("configs", "launch"):
        (root / name).symlink_to(ROOT / name)
    model = load_config("dit_digits").model
    model.update(hidden_size=32, depth=1)
    bundles.save_dit(root / "workdir" / "dit_digits" / "model", model)
    env = cpu_env(1, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    return root, env


def expected_line(line):
    return re.compile(".*".join(re.escape(part) for part in line.strip().split("...")))


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_runnable_block(block, sandbox):
    root, env = sandbox
    argv = ["bash", "-e", "-o", "pipefail", "-c", block.text] if block.lang in ("bash", "sh") else [
        sys.executable, "-c", block.text]
    result = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == block.exit_code, output[-3000:]
    for line in filter(str.strip, block.expected.splitlines()):
        assert expected_line(line).search(output), f"{block.where}: {line!r} not in the output:\n{output[-3000:]}"


@pytest.fixture(scope="module")
def flag_problems():
    """{(where, argv): the CLI's one-line flag error, or ""} for every checked ldm-jax command."""
    argvs = [argv for _, argv in CLI_COMMANDS]
    result = subprocess.run([sys.executable, "-c", FLAG_CHECKER], input=json.dumps(argvs), cwd=ROOT,
                            env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(zip(map(str, CLI_COMMANDS), json.loads(result.stdout.splitlines()[-1])))


@pytest.mark.parametrize("where_argv", CLI_COMMANDS, ids=[f"{w} {' '.join(a[:2])}" for w, a in CLI_COMMANDS])
def test_documented_command_flags_parse(where_argv, flag_problems):
    assert flag_problems[str(where_argv)] == "", f"{shlex.join(where_argv[1])}: {flag_problems[str(where_argv)]}"


@pytest.mark.parametrize("where_argv", DRY_RUNS, ids=[f"{w} {a[2]}" for w, a in DRY_RUNS])
def test_documented_launch_dry_runs(where_argv, sandbox):
    where, argv = where_argv
    result = subprocess.run(argv, cwd=sandbox[0], env=sandbox[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{where}: {shlex.join(argv)}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_python_block_compiles_and_its_imports_exist(block):
    tree = ast.parse(block.text, block.where)
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               and any(name.split(".")[0] in ("ldm_jax", "launch")
                       for name in ([node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]))]
    exec(compile(ast.Module(body=imports, type_ignores=[]), block.where, "exec"), {})
