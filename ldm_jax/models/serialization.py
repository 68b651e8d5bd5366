"""A model on disk: its class and config as JSON beside its params as an orbax checkpoint.

    <path>/model.json   {"class": "DiT", "config": {...module fields...}, "metadata": {...}}
    <path>/params/      orbax (plain 'params' collection, float32)

This is what `ldm-jax convert` writes and what sampling/evaluation read. A bundle is written to
`<path>.tmp` and renamed into place, so an interrupted write never leaves a bundle that looks whole.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# Class name -> "module:attribute"; imported lazily so a bundle only imports the model it holds.
MODEL_CLASSES = {
    "DiT": "ldm_jax.models.dit:DiT",
    "AutoencoderKL": "ldm_jax.models.vae:AutoencoderKL",
    "CLIPTextEncoder": "ldm_jax.models.clip:CLIPTextEncoder",
}
_SKIPPED_FIELDS = ("parent", "name")


def _model_class(name: str) -> type[nn.Module]:
    if name not in MODEL_CLASSES:
        raise ValueError(f"model class {name!r} is not known; allowed: {sorted(MODEL_CLASSES)}")
    module_name, attribute = MODEL_CLASSES[name].split(":")
    return getattr(importlib.import_module(module_name), attribute)


def _to_json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, (type, np.dtype)):  # dtype fields: jnp.float32, jnp.bfloat16, ...
        return {"dtype": jnp.dtype(value).name}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    if isinstance(value, dict) and set(value) == {"dtype"}:
        return jnp.dtype(value["dtype"])
    return value


def module_config(module: nn.Module) -> dict[str, Any]:
    """{"class": name, "config": fields} of a model module, JSON-serialisable."""
    name = type(module).__name__
    _model_class(name)
    config = {
        f.name: _to_json(getattr(module, f.name))
        for f in dataclasses.fields(module)
        if f.name not in _SKIPPED_FIELDS
    }
    return {"class": name, "config": config}


def module_from_config(spec: dict[str, Any]) -> nn.Module:
    cls = _model_class(spec["class"])
    return cls(**{k: _from_json(v) for k, v in spec["config"].items()})


def save_model(path: str | os.PathLike, module: nn.Module, params: Any, metadata: dict | None = None) -> None:
    """Writes a model bundle (replacing one already at `path`). Every process calls it (orbax writes
    each host's shards of sharded params); process 0 writes the JSON and renames into place."""
    path = os.path.abspath(os.fspath(path))
    tmp = f"{path}.tmp"
    leader = jax.process_index() == 0
    if leader:
        shutil.rmtree(tmp, ignore_errors=True)
    multihost_utils.sync_global_devices("ldm_jax.save_model.start")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(tmp, "params"), params)
    if leader:
        spec = module_config(module) | {"metadata": metadata or {}}
        with open(os.path.join(tmp, "model.json"), "w") as f:
            json.dump(spec, f, indent=2, sort_keys=True)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    multihost_utils.sync_global_devices("ldm_jax.save_model.end")


def load_model(path: str | os.PathLike, sharding: Any = None) -> tuple[nn.Module, Any, dict]:
    """Reads a bundle: (module, params, metadata); params laid out by `sharding` (default: one device)."""
    path = os.path.abspath(os.fspath(path))
    spec_file = os.path.join(path, "model.json")
    if not os.path.isfile(spec_file):
        raise FileNotFoundError(f"no model bundle at {path} (missing model.json)")
    with open(spec_file) as f:
        spec = json.load(f)
    params = read_tree(os.path.join(path, "params"), sharding)
    return module_from_config(spec), params, spec.get("metadata", {})


def read_tree(path: str | os.PathLike, sharding: Any = None) -> Any:
    """Reads an orbax pytree directory whatever mesh wrote it, laid out by `sharding` (one sharding
    for all leaves; default: the first local device)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(os.fspath(path))
        tree = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
        return checkpointer.restore(os.fspath(path), target)
