"""Random-access data sources: TFDS (array_record), image folders, bundled digits, cached latents.

A source is a grain `RandomAccessDataSource` (`len(src)`, `src[i]`) of plain dicts:

  image sources   {"image": PIL image or uint8 array [H, W, 3], "label": int}  (or "caption": str)
  latent caches   {"mean": [V, h, w, C], "std": [V, h, w, C], "index": int, "label" / "caption"}
                  (+ "context" [L, D], "context_mask" [L], "pooled" [D]: cached text embeddings)

Images keep their stored size; `transforms.center_crop_arr` brings them to the training resolution.
Labelled sources expose `class_names` (label i is `class_names[i]`); `LabelCaptions` gives them
captions made from those names. Nothing here downloads: TFDS datasets must be prepared beforehand,
the digits ship inside scikit-learn's wheel.
"""
from __future__ import annotations

import concurrent.futures
import functools
import io
import json
import os
import threading
import warnings
from typing import Any

from absl import logging
from array_record.python import array_record_module
from flax import serialization
import grain
import numpy as np
from PIL import Image

from ldm_jax import storage
from ldm_jax.data import transforms

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")

# Every 6th digit (by position in scikit-learn's array) is held out: 300 test, 1,497 train images.
DIGITS_TEST_EVERY = 6


class DigitsSource:
    """scikit-learn's bundled digits: 1,797 labelled 8x8 images as uint8 `[8, 8, 3]` (grey in RGB).

    Values 0..16 are scaled to 0..255. The split is fixed: every 6th image is "test", the rest
    "train".
    """

    class_names = tuple(str(d) for d in range(10))

    def __init__(self, split: str = "train"):
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

        positions = np.arange(1797)
        held_out = positions % DIGITS_TEST_EVERY == 0
        splits = {"train": ~held_out, "test": held_out}
        if split not in splits:
            raise ValueError(f"data.split={split!r} is not a split of digits; use one of {sorted(splits)}")
        digits = load_digits()
        keep = splits[split]
        grey = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)
        self._images = np.repeat(grey[..., None], 3, axis=-1)
        self._labels = digits.target[keep].astype(np.int64)
        self.split = split

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._images[index], "label": int(self._labels[index])}

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, n={len(self)})"


def image_files(folder: str, recursive: bool) -> list[str]:
    """Sorted paths of image files (by extension, hidden files skipped) in `folder` (local or gs://),
    in `os.walk` order: a folder's files, then each sub-folder's, by name."""
    found, top = [], None
    for root, dirs, files in storage.path(folder).walk():
        # epath's gs:// walk names roots without their scheme: place them relative to the first (the top)
        top = os.fspath(root) if top is None else top
        where = os.path.relpath(os.fspath(root), top)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [
            storage.join(folder, where, f)
            for f in sorted(files)
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return found


def _entries(folder: str) -> tuple[list[str], list[str]]:
    """The sorted names of the visible (not ".hidden") sub-folders and files directly in `folder`."""
    _, dirs, files = next(iter(storage.path(folder).walk()), (None, [], []))
    return sorted(d for d in dirs if not d.startswith(".")), sorted(f for f in files if not f.startswith("."))


# `warnings.catch_warnings` changes process-wide state: one thread at a time opens an image under it.
_BOMB_CHECK = threading.Lock()


def _open_image(path: str) -> Image.Image:
    """The image file at `path`, opened by PIL (a gs:// one from its bytes, named `path` in errors as
    PIL names a local file). An image of more than PIL's `Image.MAX_IMAGE_PIXELS` (a possible
    decompression bomb, which PIL refuses from twice that and below only warns about) raises
    `DecompressionBombWarning` / `DecompressionBombError` before any pixel is decoded."""
    source = io.BytesIO(storage.path(path).read_bytes()) if storage.is_remote(path) else path
    with _BOMB_CHECK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(source)
    if storage.is_remote(path):
        image.filename = path
    return image


def read_image(path: str, mode: str = "RGB") -> Image.Image:
    """The image file at `path` (local or gs://) as a loaded 8-bit PIL image of `mode`
    (`transforms.to_8bit`); a file that cannot be read, or a decompression bomb (`_open_image`), is
    a ValueError naming it."""
    try:
        image = _open_image(path)
        image.load()  # decodes now: a truncated or corrupt file fails here, named
    except Exception as err:  # pylint: disable=broad-except  (PIL raises many kinds)
        raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    with image:
        return transforms.to_8bit(image, mode)  # values out of range: its own error names the file


def _decode_error(path: str) -> str | None:
    """None when the file decodes completely (JPEGs at reduced scale, which is fast) and converts to
    8-bit RGB (`transforms.to_8bit`), else why not."""
    try:
        with _open_image(path) as image:
            image.draft("RGB", (1, 1))
            transforms.to_8bit(image)
    except Exception as err:  # pylint: disable=broad-except  (PIL raises many kinds)
        return f"{type(err).__name__}: {err}"
    return None


def _class_folder_files(path: str, class_dirs: list[str]) -> tuple[list[str], list[int]]:
    """Image paths under each class folder and their labels (the class's index in `class_dirs`)."""
    files, labels, empty = [], [], []
    for label, name in enumerate(class_dirs):
        class_files = image_files(storage.join(path, name), recursive=True)
        empty += [] if class_files else [name]
        files += class_files
        labels += [label] * len(class_files)
    if empty:
        raise ValueError(f"data.path={path!r}: class folder(s) without images: {empty}")
    return files, labels


def _caption_file(image_file: str) -> str:
    """The caption file beside an image: `cat.jpg` -> `cat.txt`."""
    return os.path.splitext(image_file)[0] + ".txt"


def _caption_folder_files(path: str, files: list[str]) -> tuple[list[str], None]:
    """Checks that a flat folder has images, each with a caption .txt beside it."""
    if not files:
        raise ValueError(f"data.path={path!r} holds no images (extensions {IMAGE_EXTENSIONS})")
    names = set(_entries(path)[1])  # one listing, not a request per image on gs://
    missing = [f for f in files if os.path.basename(_caption_file(f)) not in names]
    if missing:
        raise ValueError(
            f"data.path={path!r}: {len(missing)} image(s) have no caption .txt beside them, "
            f"e.g. {missing[:5]}"
        )
    return files, None


def _drop_unreadable(
    path: str, files: list[str], labels: list[int] | None, strict: bool, num_threads: int
) -> tuple[list[str], list[int] | None, list[str]]:
    """Decodes every file once; returns the readable files, their labels, and the skipped files.

    Unreadable files are named in one warning, or in a ValueError when `strict`.
    """
    logging.info("Checking %d images in %s (data.check_images=False skips this)", len(files), path)
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        errors = list(pool.map(_decode_error, files))
    bad = [f"{f} ({e})" for f, e in zip(files, errors) if e is not None]
    if bad and strict:
        raise ValueError(f"data.path={path!r}: {len(bad)} unreadable image(s): {bad}")
    if bad:
        logging.warning("Skipping %d unreadable image(s) in %s: %s", len(bad), path, bad)
    keep = [i for i, e in enumerate(errors) if e is None]
    if not keep:
        raise ValueError(f"data.path={path!r}: none of its images can be read")
    skipped = [f for f, e in zip(files, errors) if e is not None]
    return [files[i] for i in keep], None if labels is None else [labels[i] for i in keep], skipped


class ImageFolderSource:
    """Images in a folder (local or gs://), read with PIL when indexed (inside grain workers), as
    8-bit RGB PIL images (`transforms.to_8bit`: 16-bit and float images scaled by their range,
    out-of-range ones refused).

    Two layouts, told apart by what `path` holds:
      * class sub-folders `path/<class>/**/<image>`: label = index of the class name among the
        sorted sub-folder names (`class_names`; the latent cache saves this mapping with the cache);
      * a flat folder of images, each with a caption file beside it (`cat.jpg` + `cat.txt`):
        elements carry `"caption"` (the file's text, stripped) instead of a label.

    With `check_images`, every file is decoded once up front; the ones that fail are dropped,
    counted (`skipped`) and named in one warning, or raise a ValueError when `strict`. Without it,
    a file that fails later raises a ValueError naming it when it is read.
    """

    def __init__(self, path: str, *, check_images: bool = True, strict: bool = False, num_threads: int = 8):
        if not storage.path(path).is_dir():
            raise ValueError(f"data.path={path!r} is not an existing folder")
        class_dirs = _entries(path)[0]
        top_images = image_files(path, recursive=False)
        if class_dirs and top_images:
            raise ValueError(
                f"data.path={path!r} mixes class sub-folders {class_dirs[:5]} with loose images "
                f"{top_images[:3]}; use either class sub-folders or a flat folder with captions"
            )
        if class_dirs:
            files, labels = _class_folder_files(path, class_dirs)
        else:
            files, labels = _caption_folder_files(path, top_images)
        self.skipped: list[str] = []
        if check_images:
            files, labels, self.skipped = _drop_unreadable(path, files, labels, strict, num_threads)
        self.path = path
        self.class_names: tuple[str, ...] | None = tuple(class_dirs) if class_dirs else None
        self.files: list[str] = files
        self._labels = labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        element: dict[str, Any] = {"image": read_image(path)}
        if self._labels is None:
            element["caption"] = storage.path(_caption_file(path)).read_text(encoding="utf-8").strip()
        else:
            element["label"] = self._labels[index]
        return element

    def __repr__(self) -> str:
        return f"ImageFolderSource(path={self.path!r}, n={len(self)}, skipped={len(self.skipped)})"


class TfdsSource:
    """A prepared TFDS dataset in array_record format, read through `builder.as_data_source`.

    Elements `{"image": uint8 [H, W, C], "label": int}` taken from the dataset's `image_key` /
    `label_key` features (`label_key=None`: no label), plus `"caption": str` from a text feature
    `caption_key` when given. Never downloads or prepares anything; needs no tensorflow.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None,
        *,
        image_key: str = "image",
        label_key: str | None = "label",
        caption_key: str | None = None,
    ):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as err:
            raise ValueError(
                f"data.name={name!r} is not a known TFDS dataset (nor one prepared in "
                f"data.data_dir={data_dir!r})"
            ) from err
        if not builder.is_prepared():
            raise ValueError(
                f"TFDS dataset data.name={name!r} is not prepared in data.data_dir={data_dir!r}; "
                "nothing is downloaded at run time: prepare it first, e.g. "
                f"`tfds build {name} --data_dir=... --file_format=array_record`"
            )
        file_format = str(builder.info.file_format)
        if "array_record" not in file_format.lower():
            raise ValueError(
                f"TFDS dataset {name!r} in {builder.data_dir} is stored as {file_format}; random "
                "access needs file_format=array_record (re-prepare it in that format)"
            )
        splits = sorted(builder.info.splits.keys())
        try:
            self._source = builder.as_data_source(split=split)
        except ValueError as err:
            raise ValueError(
                f"data.split={split!r} is not a split of TFDS {name!r}; splits: {splits}"
            ) from err
        features = builder.info.features
        for key in (image_key, label_key, caption_key):
            if key is not None and key not in features:
                raise ValueError(f"TFDS {name!r} has no feature {key!r}; features: {sorted(features)}")
        label_feature = features[label_key] if label_key is not None else None
        self.class_names = tuple(label_feature.names) if hasattr(label_feature, "names") else None
        self.name, self.split = name, split
        self._image_key, self._label_key, self._caption_key = image_key, label_key, caption_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        element = {"image": example[self._image_key]}
        if self._label_key is not None:
            element["label"] = int(example[self._label_key])
        if self._caption_key is not None:
            caption = example[self._caption_key]
            element["caption"] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        return element

    def __repr__(self) -> str:
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, n={len(self)})"


class LabelCaptions:
    """A labelled source whose elements also get `"caption": template.format(name=class_names[label])`.

    `class_names` default to the source's own (e.g. "the digit {name}" with names "zero".."nine"
    gives "the digit seven" for label 7). Labels stay, so the captions stay tied to their classes.
    """

    def __init__(self, source: Any, template: str, class_names: tuple[str, ...] = ()):
        names = tuple(class_names) or getattr(source, "class_names", None)
        if not names:
            raise ValueError(f"data.caption_template={template!r} makes captions from class names, but "
                             f"{source!r} has none: set data.caption_class_names")
        own = getattr(source, "class_names", None)
        if own and len(names) != len(own):
            raise ValueError(f"data.caption_class_names has {len(names)} names for the {len(own)} classes of "
                             f"{source!r}")
        try:
            template.format(name=names[0])
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"data.caption_template={template!r} must be a format string whose only field is "
                             f"{{name}} ({type(err).__name__}: {err})") from None
        self.source, self.template, self.caption_names = source, template, names
        self.class_names = own

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        element = self.source[index]
        return {**element, "caption": self.template.format(name=self.caption_names[element["label"]])}

    def __repr__(self) -> str:
        return f"LabelCaptions({self.source!r}, template={self.template!r})"


# ---------------------------------------------------------------------------------------------
# Latent caches (written by `latent_cache.cache_latents`): the on-disk format lives here, once.
#
#   <dir>/meta.json                                  what was cached and how (see cache_latents)
#   <dir>/latents-00007-of-00042.array_record        one msgpack record per example
#   <dir>/latents-00007-of-00042.array_record.json   that shard's per-channel sums (for stats)
#   <dir>/empty_caption.npz                          with cached text embeddings: the empty
#                                                    caption's context / context_mask / pooled
#
# A shard counts only when its file holds the expected number of records and its sums file
# exists; writers produce both under temporary names and rename them when complete (upload them,
# sums first, in a gs:// cache). The sums file also records the shard's sha256 and size
# (`storage.digest`). Opening a cache whose shards total at most VERIFY_ON_OPEN_BYTES hashes every
# shard; a bigger one is not hashed on open (that would read the whole cache on every host at every
# start): array_record (riegeli) checks each chunk's own hash as a record is read, so a damaged
# record still stops training, naming its shard. Either way, no record is trained on unverified.
# ---------------------------------------------------------------------------------------------
LATENT_META = "meta.json"
EMPTY_CAPTION = "empty_caption.npz"
VERIFY_ON_OPEN_BYTES = 1 << 30
_SHARD_SUMS = ("count", "sum_mean", "sum_mean_sq", "sum_var")  # a shard's sums file: these, "sha256", "bytes"
_DAMAGED_SHARD = "delete it and its .json, then run the caching (`ldm-jax encode`) again to rewrite it"


def latent_shard_path(cache_dir: str, shard: int, num_shards: int) -> str:
    """Path of shard `shard` (0-based) of `num_shards`; its sums file is this path + ".json"."""
    return os.path.join(cache_dir, f"latents-{shard:05d}-of-{num_shards:05d}.array_record")


def latent_shard_sizes(num_examples: int, shard_size: int) -> list[int]:
    """Examples per shard: shard k holds examples [k * shard_size, min((k + 1) * shard_size, n))."""
    return [min(shard_size, num_examples - start) for start in range(0, num_examples, shard_size)]


def latent_shard_complete(path: str, num_records: int) -> bool:
    """True when `path` is a finished shard: readable, `num_records` records, sums file beside it."""
    if not (storage.path(path).is_file() and storage.path(path + ".json").is_file()):
        return False
    try:
        reader = array_record_module.ArrayRecordReader(path)
        complete = bool(reader.ok()) and reader.num_records() == num_records
        reader.close()  # raises on a damaged file
    except RuntimeError:
        return False
    return complete


def encode_latent_record(record: dict[str, Any]) -> bytes:
    """A record `{"index": int, "mean": [V, h, w, C], "std": [V, h, w, C], "label" | "caption"}`
    (+ "context", "context_mask", "pooled") -> bytes."""
    return serialization.msgpack_serialize(record)


def verify_latent_shards(paths: list[str], limit: int = VERIFY_ON_OPEN_BYTES) -> None:
    """Checks each shard's bytes against the sha256 and size in its sums file when they total at most
    `limit` bytes (the block comment above); a one-line ValueError naming the first damaged shard.
    Shards without a sums file are left to the completeness check; a cache made before digests were
    recorded gets a warning."""
    recorded = {}
    for path in paths:
        if storage.path(path + ".json").is_file():
            recorded[path] = json.loads(storage.path(path + ".json").read_text(encoding="utf-8"))
    if any("sha256" not in sums for sums in recorded.values()):
        logging.warning("latent cache %s records no shard checksums (made before ldm_jax recorded them): its "
                        "shards are not verified; encode it into a new folder to add them", os.path.dirname(paths[0]))
    expected = {path: sums for path, sums in recorded.items() if "sha256" in sums}
    total = sum(sums["bytes"] for sums in expected.values())
    if total > limit:
        logging.info("latent cache: %d shards, %.1f GiB: not hashed on open (more than %.1f GiB); array_record "
                     "checks each record's chunk hash as it is read", len(paths), total / 2**30, limit / 2**30)
        return
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        problems = list(pool.map(lambda path: _shard_problem(path, expected[path]["sha256"], expected[path]["bytes"]),
                                 expected))
    for path, problem in zip(expected, problems):
        if problem:
            raise ValueError(f"{path}: {problem}; {_DAMAGED_SHARD}")


@functools.lru_cache(maxsize=None)
def _shard_problem(path: str, sha256: str, size: int) -> str | None:
    """`storage.digest_mismatch` of a shard, hashed once per process (training opens a cache three times)."""
    return storage.digest_mismatch(path, {"sha256": sha256, "bytes": size})


def read_latent_meta(cache_dir: str) -> dict[str, Any]:
    """The cache's meta.json as a dict; ValueError when `cache_dir` holds no latent cache."""
    meta_path = os.path.join(cache_dir, LATENT_META)
    if not storage.path(meta_path).is_file():
        raise ValueError(f"data.path={cache_dir!r} holds no latent cache (no {LATENT_META})")
    return json.loads(storage.path(meta_path).read_text(encoding="utf-8"))


class LatentSource:
    """The examples of a finished latent cache: `{"index", "mean", "std", "label" | "caption"}`.

    `mean`/`std` are `[V, h, w, C]` in the stored dtype: variant 0 encodes the image, variant 1
    (present when cached with `flip=True`) its mirror. `meta` is the cache's meta.json;
    `class_names` the label names saved with the cache (None for captioned data). A cache made
    with a text encoder (`meta["text"]`) also holds each caption's "context" [L, D], "context_mask"
    [L] and "pooled" [D], and the empty caption's (`empty_caption()`). Opening it verifies the shards
    (`verify_latent_shards`, up to `verify_limit` bytes); a record that cannot be read is a one-line
    ValueError naming its shard.
    """

    def __init__(self, cache_dir: str, verify_limit: int = VERIFY_ON_OPEN_BYTES):
        self.meta = read_latent_meta(cache_dir)
        sizes = latent_shard_sizes(self.meta["num_examples"], self.meta["shard_size"])
        self._paths = [latent_shard_path(cache_dir, k, len(sizes)) for k in range(len(sizes))]
        verify_latent_shards(self._paths, verify_limit)  # first: a damaged shard is named as such, not as unfinished
        missing = [p for p, n in zip(self._paths, sizes) if not latent_shard_complete(p, n)]
        if missing:
            raise ValueError(
                f"latent cache {cache_dir!r} is incomplete: {len(missing)} of {len(sizes)} shards "
                f"missing or unfinished, e.g. {missing[:3]}; run the caching again to finish it"
            )
        self.cache_dir = cache_dir
        self.class_names = self.meta["class_names"]
        self._records = grain.sources.ArrayRecordDataSource(self._paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return serialization.msgpack_restore(self._records[index])
        except RuntimeError as error:  # array_record's (riegeli's) hashes: a damaged chunk
            shard = self._paths[index // self.meta["shard_size"]]
            reason = str(error).splitlines()[0].split(";")[0]
            raise ValueError(f"{shard}: record {index} is damaged ({reason}); {_DAMAGED_SHARD}") from error

    def empty_caption(self) -> dict[str, np.ndarray]:
        """The empty caption's cached text conditions (no batch axis); ValueError without text."""
        if not self.meta.get("text"):
            raise ValueError(f"latent cache {self.cache_dir!r} holds no text embeddings (it was made without "
                             "text.encoder_path)")
        with storage.path(os.path.join(self.cache_dir, EMPTY_CAPTION)).open("rb") as f, np.load(f) as data:
            return {key: data[key] for key in data.files}

    def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std `[C]` of latents z = mean + std * eps over the whole cache.

        From each shard's sums: E[z] = E[mean], Var[z] = E[mean^2] - E[mean]^2 + E[std^2].
        """
        totals = None
        for path in self._paths:
            sums = json.loads(storage.path(path + ".json").read_text(encoding="utf-8"))
            sums = {k: np.asarray(sums[k], np.float64) for k in _SHARD_SUMS}
            totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
        count = totals["count"]
        mean = totals["sum_mean"] / count
        var = totals["sum_mean_sq"] / count - mean**2 + totals["sum_var"] / count
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)

    def __repr__(self) -> str:
        return f"LatentSource(cache_dir={self.cache_dir!r}, n={len(self)})"
