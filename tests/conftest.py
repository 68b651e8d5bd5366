"""Test session set-up: 8 simulated CPU devices, so every sharding path runs on a real mesh.

The flag must be set before jax is imported anywhere in the process.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """Committed golden fixtures, made by the generators in tools/fixtures/ (need torch + diffusers)."""
    return FIXTURES
