"""A model on disk: its class and config as JSON beside its params as an orbax checkpoint.

    <path>/model.json   {"class": "DiT", "config": {...module fields...}, "metadata": {...}}
    <path>/params/      orbax (plain 'params' collection, float32)

This is what `ldm-jax convert` writes and what sampling/evaluation read. `save_model` never deletes
what it did not write: it refuses a target that is neither missing, an empty directory nor a bundle
(model.json and params/, nothing else), and replaces a bundle only when asked (`overwrite=True`).
A local bundle is written beside the target, to `<path>.tmp-<random>`, then published: a bundle
already at `<path>` is renamed aside (`<path>.tmp-<random>-old`), the new one renamed into place and
the old one removed; so an interrupted write never leaves a bundle at `<path>` that looks whole but
is not. A failed write removes its temporary directory (a killed one's is removed by the next save
to `<path>`, if it holds nothing but a bundle's files), and a full disk is reported as one
OSError(ENOSPC) naming the path.

A `gs://` bundle (an object store renames nothing) is written in place, and model.json, written
last, commits it: params/ without model.json is an incomplete bundle, which readers refuse
(`check_bundle`). Replacing one (`overwrite`, also needed for an incomplete one) removes its
model.json first, then its params; so a kill part-way leaves an incomplete bundle, never a mix of
two that looks whole.

model.json also records each params file's sha256 and size ("checksums", computed from the stored
bytes once orbax has written them); `load_model` checks them before restoring, so a damaged or
truncated file is refused by name instead of loading as wrong (NaN) weights. Bundles saved before
checksums were recorded load with a warning.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import importlib
import json
import os
import secrets
import shutil
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ldm_jax import storage

# The bundle classes besides the denoisers (which `models/backbones.py` registers), by class name ->
# "module:attribute"; imported lazily so a bundle only imports the model it holds.
MODEL_CLASSES = {
    "AutoencoderKL": "ldm_jax.models.vae:AutoencoderKL",
    "CLIPTextEncoder": "ldm_jax.models.clip:CLIPTextEncoder",
}
_SKIPPED_FIELDS = ("parent", "name")
_BUNDLE_FILES = ("model.json", "params")
_ORBAX_PARTIAL = "params.orbax-checkpoint-tmp"  # orbax's name for params/ while it writes them
_CHECKSUMS = "checksums"  # model.json: {"params/<file>": {"sha256": hex, "bytes": size}}
_HASH_THREADS = 8  # files hashed at once (reads of a gs:// bundle overlap)


def _model_class(name: str) -> type[nn.Module]:
    """A bundle's class by name: a registered backbone or one of MODEL_CLASSES."""
    from ldm_jax.models.backbones import BACKBONES  # backbones import their models; lazily, as above

    backbones = {backbone.module.__name__: backbone.module for backbone in BACKBONES.values()}
    if name in backbones:
        return backbones[name]
    if name not in MODEL_CLASSES:
        raise ValueError(f"model class {name!r} is not known; allowed: {sorted(MODEL_CLASSES.keys() | backbones.keys())}")
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


def module_from_spec(spec: dict[str, Any]) -> nn.Module:
    """A model.json spec {"class", "config"} -> the module."""
    cls = _model_class(spec["class"])
    return cls(**{k: _from_json(v) for k, v in spec["config"].items()})


def save_model(path: str | os.PathLike, module: nn.Module, params: Any, metadata: dict | None = None, *,
               overwrite: bool = False) -> None:
    """Writes a model bundle to `path` (parents created) and publishes it atomically (module
    docstring); a bundle already there is replaced only with `overwrite`. Every process calls it
    (orbax writes each host's shards of sharded params); process 0 writes the JSON and publishes."""
    path = check_target(path, overwrite)
    spec = module_config(module) | {"metadata": metadata or {}}
    remote = storage.is_remote(path)
    staging = path if remote else path.with_name(f"{path.name}.tmp-{_shared_token()}")
    leader = jax.process_index() == 0
    if leader and remote:
        _uncommit(path)
    elif leader:
        _remove_stale(path)
    multihost_utils.sync_global_devices("ldm_jax.save_model.start")
    _check_free_space(path, params)  # a write that runs out of space part-way also prints orbax's tracebacks
    with reporting_disk_full(path):
        try:
            if leader:
                staging.mkdir(parents=True, exist_ok=remote)
            # Synchronous (it syncs the processes first): the async one leaves threads waiting after a failure.
            with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
                checkpointer.save(staging / "params", args=ocp.args.StandardSave(params))
            if leader:
                spec[_CHECKSUMS] = params_checksums(staging)
                (staging / "model.json").write_text(json.dumps(spec, indent=2, sort_keys=True))  # commits a gs:// one
                if not remote:
                    _publish(staging, path)
        except BaseException:
            if leader and remote:
                _uncommit(path)
            elif leader and staging.exists():
                staging.rmtree()
            raise
    multihost_utils.sync_global_devices("ldm_jax.save_model.end")


def check_target(path: str | os.PathLike, overwrite: bool = False) -> epath.Path:
    """`path` made absolute, if `save_model` may write there; else a one-line ValueError saying why.

    Allowed: a missing path whose nearest existing ancestor is a writable directory, an empty
    directory, or (with `overwrite`) a model bundle; on gs://, with `overwrite`, an incomplete one too."""
    path = _absolute(path)
    remote = storage.is_remote(path)
    if path.is_dir() and _is_bundle(path):
        if not overwrite:
            raise ValueError(f"{path} holds a model bundle already; pass --overwrite (overwrite=True) to replace it")
    elif remote and path.is_dir() and _is_incomplete(path):
        if not overwrite:
            raise ValueError(f"{path} holds an incomplete model bundle (an interrupted save); pass --overwrite "
                             "(overwrite=True) to replace it")
    elif path.is_dir() and any(path.iterdir()):
        raise ValueError(f"{path} is neither empty nor a model bundle (it holds {_listing(path)}); "
                         "write the bundle to a new or empty directory")
    elif path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a directory for a model bundle")
    if remote:
        return path  # no directories to check: an object store has none
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise ValueError(f"cannot write a model bundle to {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write a model bundle to {path}: {ancestor} is not writable")
    return path


@contextlib.contextmanager
def reporting_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Re-raises an error saying the disk is full (an OSError with ENOSPC, or a tensorstore or
    array_record error with its message) as one OSError(ENOSPC, "disk full", path)."""
    try:
        yield
    except Exception as error:
        if _says_disk_full(error):
            raise OSError(errno.ENOSPC, "disk full", os.fspath(path)) from error
        raise


def _says_disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _check_free_space(path: epath.Path, params: Any) -> None:
    """OSError(ENOSPC) when the local disk at `path` has less room than the params' bytes."""
    if storage.is_remote(path):
        return
    needed = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"disk full ({free / 2**20:.1f} MiB free, the params need "
                      f"{needed / 2**20:.1f} MiB)", os.fspath(path))


def _existing_ancestor(path: epath.Path) -> epath.Path:
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    return ancestor


def _absolute(path: str | os.PathLike) -> epath.Path:
    path = storage.path(path)
    return path if storage.is_remote(path) else path.resolve()


def _is_bundle(path: epath.Path) -> bool:
    """A bundle this module wrote: model.json and params/, nothing else."""
    return sorted(p.name for p in path.iterdir()) == sorted(_BUNDLE_FILES) and (path / "params").is_dir()


def _is_incomplete(path: epath.Path) -> bool:
    """A gs:// bundle whose save was interrupted before its model.json: params/ alone."""
    return [p.name for p in path.iterdir()] == ["params"]


def _listing(path: epath.Path, limit: int = 5) -> str:
    names = sorted(p.name + "/" * p.is_dir() for p in path.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _shared_token() -> str:
    """8 random hex digits, process 0's on every process."""
    return f"{int(multihost_utils.broadcast_one_to_all(np.uint32(secrets.randbits(32)))):08x}"


def _remove_stale(path: epath.Path) -> None:
    """Removes `<path>.tmp*` directories left by killed saves: those holding only a bundle's files."""
    if not path.parent.is_dir():
        return
    for stale in path.parent.iterdir():
        if stale.name.startswith(f"{path.name}.tmp") and stale.is_dir() and all(
            p.name in _BUNDLE_FILES or p.name.startswith(_ORBAX_PARTIAL) for p in stale.iterdir()
        ):
            stale.rmtree()


def _uncommit(path: epath.Path) -> None:
    """Removes the gs:// bundle at `path`: its model.json first (it is incomplete from then on), then params/."""
    if (path / "model.json").exists():
        (path / "model.json").unlink()
    if (path / "params").is_dir():
        (path / "params").rmtree()


def _publish(tmp: epath.Path, path: epath.Path) -> None:
    """Renames the finished bundle `tmp` to `path` (an empty directory, a bundle, or nothing)."""
    if path.is_dir() and not _is_bundle(path):
        path.rmdir()  # check_target let it through empty; rmdir fails if it is not any more
    if not path.exists():
        tmp.rename(path)
        return
    old = tmp.with_name(f"{tmp.name}-old")
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)
        raise
    old.rmtree()


def load_model(path: str | os.PathLike, sharding: Any = None) -> tuple[nn.Module, Any, dict]:
    """Reads a bundle: (module, params, metadata); params laid out by `sharding` (default: one device)."""
    path = check_bundle(path)
    spec = json.loads((path / "model.json").read_text())
    try:  # an unknown class or field, a missing or mistyped entry: named before any param is read
        module = module_from_spec(spec)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path / 'model.json'}: not a model this version of ldm_jax can build "
                         f"({type(error).__name__}: {error})") from error
    verify_params(path, spec.get(_CHECKSUMS))
    params = read_tree(path / "params", sharding)
    return module, params, spec.get("metadata", {})


def params_checksums(bundle: epath.Path) -> dict[str, dict[str, Any]]:
    """{"params/<relative path>": {"sha256": hex, "bytes": size}} of every file under `bundle`/params."""
    files = sorted(storage.files(bundle / "params"))
    with concurrent.futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(storage.digest, files))
    return {os.fspath(file.relative_to(bundle)): digest for file, digest in zip(files, digests)}


def verify_params(bundle: epath.Path, checksums: dict[str, dict[str, Any]] | None) -> None:
    """A one-line ValueError naming the first params file of `bundle` that is missing, or whose size or
    sha256 differs from `checksums` (model.json's, recorded at save); a warning when there are none."""
    if checksums is None:
        logging.warning("%s records no checksums (saved before ldm_jax recorded them): its params are not "
                        "verified; save it again to add them", bundle)
        return
    names = sorted(checksums)
    with concurrent.futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
        problems = list(pool.map(lambda name: storage.digest_mismatch(bundle / name, checksums[name]), names))
    for name, problem in zip(names, problems):
        if problem:
            raise ValueError(f"{bundle / name}: {problem}; re-export or re-convert the bundle")


def check_bundle(path: str | os.PathLike) -> epath.Path:
    """`path` made absolute if it holds a model bundle (its model.json, which a save writes last);
    else a one-line FileNotFoundError saying what is missing."""
    path = storage.path(path)
    if (path / "model.json").is_file():
        return path
    if (path / "params").is_dir():
        raise FileNotFoundError(f"{path} holds an incomplete model bundle: params/ without model.json, which a "
                                "save writes last (the save was interrupted; save it again)")
    raise FileNotFoundError(f"no model bundle at {path} (missing model.json)")


def read_tree(path: str | os.PathLike, sharding: Any = None) -> Any:
    """Reads an orbax pytree directory whatever mesh wrote it, laid out by `sharding` (one sharding
    for all leaves; default: the first local device)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(os.fspath(path))
        tree = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
        return checkpointer.restore(os.fspath(path), target)


def params_sha256(params: Any) -> str:
    """sha256 over the parameter leaves in tree order (path, dtype, shape and bytes of each).

    Leaves must be fully present on this host (numpy, or replicated / single-device jax arrays)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype.str}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
