"""Where the project reads and writes: a local path or a URI (`gs://bucket/run`), through one layer.

Every file operation goes through `etils.epath` (which orbax uses too), so a workdir, a bundle, a
latent cache or a sample folder may live in a GCS bucket. Never `os.path.abspath` a location (it
turns `gs://b/run` into a local folder `./gs:/b/run`) nor `os.replace`/`open` it.

Object stores have no atomic rename, but a single object upload is atomic: a reader sees the old
object or the new one, never half of one. `write_atomic` relies on that for URIs and on
`os.replace` of a temporary file for local paths. Several files that belong together are published
by writing a commit marker last (see `inference/sample_files.py`, `models/serialization.py`).

epath reaches GCS through fsspec/gcsfs (`EPATH_USE_TF=false`, the default here unless the user set
it), the same client on a TPU VM as against the local emulator the tests use.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Iterator, Union

os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402 - after the backend choice above
import fsspec.config  # noqa: E402
import fsspec.core  # noqa: E402

# gcsfs caches folder listings per process: an object that another process (a host, a rerun) wrote
# after a listing would stay invisible to exists()/is_file(). Every look-up asks the bucket instead.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)

Location = Union[str, os.PathLike]
REMOTE_SCHEMES = ("gs://",)


def is_remote(location: Location) -> bool:
    """True for an object-store URI (`gs://...`)."""
    return os.fspath(location).startswith(REMOTE_SCHEMES)


def path(location: Location) -> epath.Path:
    """An `epath.Path` for a local path (made absolute) or a `gs://` URI; other schemes are refused."""
    text = os.fspath(location)
    if "://" in text and not is_remote(text):
        raise ValueError(f"{text}: unsupported storage scheme (a local path or {', '.join(REMOTE_SCHEMES)})")
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))


def join(location: Location, *names: str) -> str:
    """`location/names...` as a string, keeping a URI a URI."""
    return os.fspath(path(location).joinpath(*names))


def staging_path(target: epath.Path) -> epath.Path:
    """The local file a local `target` is written through: one fixed name, so a restart after a kill reuses
    (overwrites) it rather than leaving one leftover per kill."""
    return target.parent / f".{target.name}.tmp"


def _publish_local(temporary: epath.Path, target: epath.Path) -> None:
    """fsync, then rename onto `target`: after a crash the file is the old one or the whole new one."""
    with open(temporary, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(temporary, target)


def write_atomic(target: Location, data: bytes) -> None:
    """Writes `data` so that a reader, or a restart after a kill, sees the old file or the new one."""
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_bytes(data)  # one object upload: visible only once complete
        return
    temporary = staging_path(target)
    try:
        temporary.write_bytes(data)
        _publish_local(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()


@contextlib.contextmanager
def local_copy(source: Location) -> Iterator[str]:
    """A local file path holding `source`'s bytes, for readers that only open local files."""
    if not is_remote(source):
        yield os.fspath(path(source))
        return
    with tempfile.TemporaryDirectory(prefix="ldm_jax-") as folder:
        local = os.path.join(folder, path(source).name)
        with path(source).open("rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst)
        yield local


@contextlib.contextmanager
def staged_file(target: Location) -> Iterator[str]:
    """A local path to write `target` through (for writers that only write local files): published
    to `target` on a clean exit (renamed locally, uploaded to a URI), discarded on an error."""
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(target):
        temporary = staging_path(target)
        try:
            yield os.fspath(temporary)
            _publish_local(temporary, target)
        finally:
            if temporary.exists():
                temporary.unlink()
        return
    with tempfile.TemporaryDirectory(prefix="ldm_jax-") as folder:
        local = os.path.join(folder, target.name)
        yield local
        # One upload that creates the object only when complete: an error or a kill midway leaves
        # no object (a file object closed on an error would publish what it had).
        filesystem, remote = fsspec.core.url_to_fs(os.fspath(target))
        filesystem.put_file(local, remote)


def move(source: Location, target: Location) -> None:
    """Moves a file or a folder to `target`, which must not exist (FileExistsError).

    Locally one `os.rename`. An object store cannot rename a prefix: every object is copied to
    `target` first, then the source's are deleted, so a kill at any point leaves a complete copy."""
    source, target = path(source), path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; {source} was not moved there")
    if not is_remote(source):
        os.rename(source, target)
        return
    if not source.is_dir():
        source.copy(target)
        source.unlink()
        return
    for file in files(source):
        file.copy(target / file.relative_to(source))
    source.rmtree()


def files(folder: epath.Path) -> Iterator[epath.Path]:
    """Every file below `folder`, at any depth."""
    for child in folder.iterdir():
        if child.is_dir():
            yield from files(child)
        else:
            yield child


def digest(location: Location) -> dict[str, int | str]:
    """{"sha256": hex, "bytes": size} of a file's bytes (read in 16 MiB blocks); FileNotFoundError when
    it is missing. Recorded when a file is written, compared when it is read (integrity checks)."""
    sha256, size = hashlib.sha256(), 0
    with path(location).open("rb") as f:
        while block := f.read(1 << 24):
            sha256.update(block)
            size += len(block)
    return {"sha256": sha256.hexdigest(), "bytes": size}


def digest_mismatch(location: Location, expected: dict[str, int | str]) -> str | None:
    """Why the file at `location` is not the one whose `digest` was `expected` (it is missing, its size
    differs: truncated, or its sha256 does: damaged), as a phrase; None when it is that file."""
    try:
        actual = digest(location)
    except FileNotFoundError:
        return "missing"
    if actual["bytes"] != expected["bytes"]:
        return f"{actual['bytes']} bytes, {expected['bytes']} when written (the file is truncated or damaged)"
    if actual["sha256"] != expected["sha256"]:
        return "checksum mismatch (the file is damaged)"
    return None
