"""Mesh construction from config sizes on the 8 simulated devices."""
import jax
import pytest

from ldm_jax.parallel import mesh as mesh_lib


@pytest.mark.parametrize(
    "sizes, shape",
    [
        ({"data": -1}, (8, 1, 1)),
        ({"data": 2, "fsdp": -1}, (2, 4, 1)),
        ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
        ({"data": 1, "fsdp": 1, "tensor": -1}, (1, 1, 8)),
    ],
)
def test_mesh_shape_resolves_fill(sizes, shape):
    assert mesh_lib.mesh_shape(sizes, 8) == shape
    mesh = mesh_lib.make_mesh(sizes)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.devices.size == jax.device_count() == 8


@pytest.mark.parametrize(
    "sizes, field",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, "must equal the number of devices"),
        ({"data": 3, "fsdp": -1}, "does not divide"),
        ({"data": -1, "fsdp": -1}, "only one axis may be -1"),
        ({"data": 0}, "mesh.data=0"),
        ({"tensor": 2.0}, "mesh.tensor=2.0"),
    ],
)
def test_bad_mesh_sizes_name_the_field(sizes, field):
    with pytest.raises(ValueError, match=field):
        mesh_lib.mesh_shape(sizes, 8)


def test_batch_sharding_splits_over_data_and_fsdp():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = jax.device_put(jax.numpy.zeros((8, 3)), mesh_lib.batch_sharding(mesh))
    assert {shard.data.shape for shard in x.addressable_shards} == {(2, 3)}


def test_distributed_requires_process_fields(monkeypatch):
    for name in ("LDM_JAX_NUM_PROCESSES", "LDM_JAX_PROCESS_ID", "LDM_JAX_COORDINATOR"):
        monkeypatch.delenv(name, raising=False)
    mesh_lib.initialize_distributed({})  # one process: nothing to do
    with pytest.raises(ValueError, match="distributed.num_processes"):
        mesh_lib.initialize_distributed({"coordinator_address": "127.0.0.1:1234"})
