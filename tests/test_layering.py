"""The package's layers: inference and evaluation import nothing from training (a sampling or
evaluation job never loads the trainer), and evaluation does not import the sampling command."""
import subprocess
import sys

import pytest

from subprocesses import cpu_env

# Imports `modules` with the named packages unimportable; prints the ldm_jax modules loaded.
_PROBE = """
import importlib, sys
blocked = {blocked!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ImportError(f"{{name}} is blocked")
        return None

sys.meta_path.insert(0, Block())
for module in {modules!r}:
    importlib.import_module(module)
print(" ".join(sorted(m for m in sys.modules if m.startswith("ldm_jax"))))
"""


def _loaded(modules, blocked):
    result = subprocess.run([sys.executable, "-c", _PROBE.format(modules=modules, blocked=blocked)],
                            env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return set(result.stdout.split())


@pytest.mark.parametrize("modules", [
    ["ldm_jax.inference.sampling", "ldm_jax.inference.bundles", "ldm_jax.inference.generation"],
    ["ldm_jax.evaluation.fid"],
])
def test_imports_with_training_unimportable(modules):
    loaded = _loaded(modules, ["ldm_jax.training"])
    assert set(modules) <= loaded


def test_evaluation_does_not_import_the_sampling_command():
    loaded = _loaded(["ldm_jax.evaluation.fid"], ["ldm_jax.inference.sampling"])
    assert "ldm_jax.inference.sample_files" in loaded


def test_the_probe_blocks_what_it_names():
    result = subprocess.run([sys.executable, "-c", _PROBE.format(modules=["ldm_jax.training.loop"],
                                                                 blocked=["ldm_jax.training"])],
                            env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "ldm_jax.training is blocked" in result.stderr
