"""Test session set-up: 8 simulated CPU devices, so every sharding path runs on a real mesh.

The flag must be set before jax is imported anywhere in the process.
"""
import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the test processes and the subprocesses they start (which
# inherit the environment): the same tiny programs compile once per checkout, not once per process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """Committed golden fixtures, made by the generators in tools/fixtures/ (need torch + diffusers)."""
    return FIXTURES


# Modules that train a model for minutes: collected first, so that `pytest -n 2 --dist loadfile`
# hands them out at the start and the short modules fill the other worker meanwhile (the run's wall
# time is then close to the total work / workers, not the work plus the last long module).
LONG_MODULES = ("test_readme_training.py", "test_inpainting_trained.py", "test_upscaling_trained.py", "test_text_to_image.py")


def pytest_configure(config):
    # xdist otherwise orders modules by their number of tests, which puts these last.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONG_MODULES)  # stable: the order within stays


@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator (`tests/gcs.py`) for this test process, its clients pointed at it; `gcs.env`
    goes to the subprocesses a test starts, `gcs.uri(...)` names objects in its bucket."""
    from gcs import gcs_emulator

    emulator = gcs_emulator()
    emulator.install()
    yield emulator
    emulator.stop()
