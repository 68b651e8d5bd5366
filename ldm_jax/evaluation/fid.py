"""Evaluating samples against a reference: FID, sFID, Inception Score, precision/recall.

    module, params = inception_from_pytorch_fid(".../pt_inception-2015-12-05-6726825d.pth")
    extractor = InceptionFeatures(module, params, batch_size=64, mesh=mesh)
    results = evaluate("samples.npz", "VIRTUAL_imagenet256_labeled.npz", extractor)  # a JSON-able dict

    results, path = evaluate_from_config(config, workdir)   # `ldm-jax evaluate`: + evaluation.json

Reference batches are ADM's `.npz` files: `mu` [2048], `sigma` [2048, 2048] (pool features),
`mu_s` [2023], `sigma_s` [2023, 2023] (spatial features), and/or `arr_0`, uint8 images
[M, H, W, 3]. As in ADM's evaluator, stored statistics are used when present, else computed from
`arr_0`; precision/recall need the reference images (their pool features), so they are null when
the file has none. A folder of images or an `ImageSet` (e.g. a dataset's images) is a reference
by its images alone. Samples are a `.npz` with `arr_0` (uint8 [N, H, W, 3]) or a folder of images.

ADM computed its stored statistics with TF's graph, which resizes inside the graph with TF's own
bilinear kernel and normalises as (x - 128) / 128; pytorch-fid's preprocessing, which
`InceptionV3` follows, differs slightly, so numbers against stored statistics carry the same small
offset as pytorch-fid's numbers.

Every file and folder (samples, references, the Inception weights, evaluation.json) may be a local
path or a `gs://` URI (`storage`).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np
import scipy

import ldm_jax
from ldm_jax import storage
from ldm_jax.convert.inception import inception_params_from_state_dict
from ldm_jax.convert.torch_io import load_state_dict
from ldm_jax.data import pipeline
from ldm_jax.evaluation import metrics
from ldm_jax.inference import sample_files
from ldm_jax.evaluation.features import (
    ImageSet,
    InceptionFeatures,
    folder_images,
    image_files,
    npz_images,
    npz_keys,
    open_images,
    reading_npz,
    source_images,
)
from ldm_jax.models.inception import IMAGE_SIZE, InceptionV3
from ldm_jax.parallel import mesh as mesh_lib

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IMAGES_KEY = "arr_0"
DATA_REFERENCE = "data"  # evaluate.reference: the config's own data
RESULTS_FILE = "evaluation.json"
FULL_POOL_WIDTH = 2048  # pool features of the full-width network


def statistics(activations: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"pool": [N, D], "spatial": [N, Ds], ...} -> ADM's {"mu", "sigma", "mu_s", "sigma_s"} (float64)."""
    mu, sigma = metrics.feature_statistics(activations["pool"], "pool features")
    mu_s, sigma_s = metrics.feature_statistics(activations["spatial"], "spatial features")
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def write_reference_npz(path: str, stats: dict[str, np.ndarray]) -> None:
    """Writes statistics (from `statistics`) as an ADM-style reference `.npz` without images."""
    np.savez(path, **{k: stats[k] for k in STAT_KEYS})


def _expected_shapes(pool_dim: int, spatial_dim: int) -> dict[str, tuple[int, ...]]:
    return {"mu": (pool_dim,), "sigma": (pool_dim, pool_dim), "mu_s": (spatial_dim,), "sigma_s": (spatial_dim, spatial_dim)}


def load_reference_statistics(path: str, pool_dim: int, spatial_dim: int) -> dict[str, np.ndarray] | None:
    """The stored `mu`, `sigma`, `mu_s`, `sigma_s` of a reference `.npz` (float64), or None when it
    stores none. Raises a ValueError naming the key when one is missing, misshaped or not float."""
    keys = npz_keys(path)
    present = [k for k in STAT_KEYS if k in keys]
    if not present:
        return None
    missing = [k for k in STAT_KEYS if k not in keys]
    if missing:
        raise ValueError(f"{path}: reference statistics {present} are stored but {missing} are missing")
    stats = {}
    with reading_npz(path), storage.path(path).open("rb") as file, np.load(file) as data:
        for key, shape in _expected_shapes(pool_dim, spatial_dim).items():
            value = data[key]
            if value.shape != shape or value.dtype.kind != "f":
                raise ValueError(f"{path}: reference {key!r} must be a float array of shape {shape}, got {value.dtype} {value.shape}")
            stats[key] = value.astype(np.float64)
    return stats


@dataclasses.dataclass(frozen=True)
class Reference:
    """What samples are compared with: stored statistics (ADM's keys, float64) and/or images."""

    name: str
    stats: dict[str, np.ndarray] | None
    images: ImageSet | None


def open_reference(reference: str | ImageSet, pool_dim: int, spatial_dim: int) -> Reference:
    """An ADM reference batch `.npz` (statistics and/or `arr_0`), a folder of images, or an
    `ImageSet`; everything but the image pixels is checked now."""
    if isinstance(reference, ImageSet):
        return Reference(reference.name, None, reference)
    if storage.path(reference).is_dir():
        return Reference(reference, None, folder_images(reference))
    if not (reference.endswith(".npz") and storage.path(reference).is_file()):
        raise ValueError(f"reference={reference!r} must be an existing ADM reference batch .npz or a folder of images")
    stats = load_reference_statistics(reference, pool_dim, spatial_dim)
    images = npz_images(reference, IMAGES_KEY) if IMAGES_KEY in npz_keys(reference) else None
    if stats is None and images is None:
        raise ValueError(f"{reference}: a reference batch needs {list(STAT_KEYS)} or images {IMAGES_KEY!r}")
    return Reference(reference, stats, images)


def check_sample_counts(samples: ImageSet, reference: Reference, num_splits: int, k: int) -> None:
    """Raises a ValueError naming the count and the setting when a metric cannot be computed."""
    n = samples.num_images
    m = None if reference.images is None else reference.images.num_images
    if num_splits < 1 or k < 1:
        raise ValueError(f"num_splits={num_splits} and k={k} (evaluate.num_splits, evaluate.k) must be >= 1")
    if n < 2:
        raise ValueError(f"{samples.name}: {n} sample(s); FID and sFID need at least 2")
    if reference.stats is None and m < 2:
        raise ValueError(f"{reference.name}: {m} reference image(s); FID and sFID need at least 2")
    if n < 2 * num_splits:
        raise ValueError(
            f"{samples.name}: {n} samples are too few for the Inception Score in num_splits={num_splits} "
            f"parts (evaluate.num_splits): it needs at least {2 * num_splits}"
        )
    if m is not None and min(n, m) <= k:
        raise ValueError(
            f"precision/recall with k={k} (evaluate.k) need more than {k} samples and reference images; "
            f"got {n} samples ({samples.name}) and {m} reference images ({reference.name})"
        )


def evaluate(
    samples: str | ImageSet,
    reference: str | ImageSet,
    extractor: InceptionFeatures,
    *,
    num_splits: int = metrics.IS_SPLITS,
    k: int = metrics.PR_NEIGHBOURS,
) -> dict[str, Any]:
    """FID, sFID, Inception Score (mean, std), precision and recall of `samples` (a `.npz` with
    `arr_0`, an image folder or an `ImageSet`) against `reference` (see `open_reference`), as a
    JSON-serialisable dict of floats / ints / None. Inputs and sample counts are checked before
    any feature is computed (`check_sample_counts`)."""
    samples = open_images(samples) if isinstance(samples, str) else samples
    sizes = extractor.feature_sizes()
    reference = open_reference(reference, sizes["pool"], sizes["spatial"])
    check_sample_counts(samples, reference, num_splits, k)
    sample_acts = extractor.extract_set(samples)
    ref_acts = None if reference.images is None else extractor.extract_set(reference.images)
    ref_stats = statistics(ref_acts) if reference.stats is None else reference.stats
    sample_stats = statistics(sample_acts)
    inception_score, inception_score_std = metrics.inception_score(sample_acts["logits_unbiased"], num_splits)
    precision = recall = None
    if ref_acts is not None:
        precision, recall = metrics.precision_recall(ref_acts["pool"], sample_acts["pool"], k)
    return {
        "num_samples": int(len(sample_acts["pool"])),
        "num_reference_images": None if ref_acts is None else int(len(ref_acts["pool"])),
        "fid": metrics.frechet_distance(sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"]),
        "sfid": metrics.frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"], ref_stats["mu_s"], ref_stats["sigma_s"]),
        "inception_score": inception_score,
        "inception_score_std": inception_score_std,
        "precision": precision,
        "recall": recall,
    }


# ----------------------------------------------------------------------------- `ldm-jax evaluate`


def load_inception(path: str, *, image_size: int = IMAGE_SIZE) -> tuple[InceptionV3, Any, dict[str, Any]]:
    """pytorch-fid's weights at `path` (evaluate.inception_path) -> (InceptionV3, params, what they
    are). The widths and classes are read from the file's `fc.weight` [classes, 2048 / divisor]."""
    if not path:
        raise ValueError("evaluate.inception_path is empty: set it to pytorch-fid's FID Inception weights "
                         "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)")
    if not storage.path(path).is_file():
        raise FileNotFoundError(f"evaluate.inception_path={path!r}: no such file")
    state = load_state_dict(path)
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or np.ndim(fc) != 2 or FULL_POOL_WIDTH % np.shape(fc)[1]:
        raise ValueError(f"evaluate.inception_path={path!r}: no 'fc.weight' [classes, 2048 / d]; "
                         "not pytorch-fid's FID Inception weights")
    num_classes, width = np.shape(fc)
    module = InceptionV3(width_divisor=FULL_POOL_WIDTH // width, num_classes=num_classes, image_size=image_size)
    params = inception_params_from_state_dict(state, module, f"FID Inception weights {path}")
    about = {"path": os.fspath(storage.path(path)), "sha256": storage.digest(path)["sha256"],
             "width_divisor": module.width_divisor, "num_classes": num_classes, "image_size": image_size}
    return module, params, about


def folder_sha256(folder: str) -> str:
    """sha256 over the image files below `folder` (their relative paths and contents, sorted)."""
    digest = hashlib.sha256()
    top = storage.join(folder)
    for file in image_files(folder):
        digest.update(f"{file[len(top) + 1:]}:{storage.digest(file)['sha256']};".encode())
    return digest.hexdigest()


def _fingerprint(path: str) -> dict[str, str]:
    sha = folder_sha256(path) if storage.path(path).is_dir() else storage.digest(path)["sha256"]
    return {"path": os.fspath(storage.path(path)), "sha256": sha}


def _samples_path(config: Any, workdir: str) -> str:
    """evaluate.samples, or what `ldm-jax sample` writes: `<sample.out_dir or workdir/samples>/samples.npz`."""
    path = config.evaluate.samples
    if not path:
        out_dir = config.sample.out_dir or storage.join(workdir, "samples")
        path = storage.join(out_dir, sample_files.SAMPLES_FILE)
        if not storage.path(path).is_file():
            raise FileNotFoundError(f"evaluate.samples is unset and {path} does not exist: run `ldm-jax sample` "
                                    "with sample.num_samples > 0, or set evaluate.samples")
    if not storage.path(path).exists():
        raise FileNotFoundError(f"evaluate.samples={path!r}: no such file or folder")
    if not (storage.path(path).is_dir() or path.endswith(".npz")):
        raise ValueError(f"evaluate.samples={path!r} must be a samples .npz (arr_0) or a folder of images")
    return path


def _sampling_protocol(samples: str) -> tuple[str | None, Any]:
    """(path, content) of the `protocol.json` `ldm-jax sample` wrote beside a samples .npz (or in a
    samples folder); (None, None) when there is none."""
    folder = storage.path(samples) if storage.path(samples).is_dir() else storage.path(samples).parent
    path = folder / sample_files.PROTOCOL_FILE
    if not path.is_file():
        return None, None
    return os.fspath(path), json.loads(path.read_text())


def _reference_from_config(config: Any) -> tuple[str | ImageSet, dict[str, Any]]:
    """evaluate.reference -> (what `evaluate` takes, its protocol entry without hashes)."""
    reference = config.evaluate.reference
    if not reference:
        raise ValueError("evaluate.reference is empty: set it to an ADM reference batch .npz (e.g. "
                         "VIRTUAL_imagenet256_labeled.npz), a folder of images, or 'data' (the config's data)")
    if reference == DATA_REFERENCE:
        data = pipeline.resolve_config(config.data)
        if data.source == "latents":
            raise ValueError("evaluate.reference='data' needs images, but data.source='latents' holds VAE latents: "
                             "use an image source, or a reference .npz or folder")
        source = pipeline.make_source(data)
        where = data.name if data.source == "tfds" else data.path
        name = f"data (source={data.source} {where} split={data.split}, center-cropped to {data.image_size})"
        fields = ("source", "name", "data_dir", "path", "split", "image_size")
        return (source_images(source, data.image_size, name, data.num_threads),
                {"data": {f: data[f] for f in fields}, "num_images": len(source)})
    if not storage.path(reference).exists():
        raise FileNotFoundError(f"evaluate.reference={reference!r}: no such file or folder")
    if not (storage.path(reference).is_dir() or reference.endswith(".npz")):
        raise ValueError(f"evaluate.reference={reference!r} must be an ADM reference batch .npz, a folder of "
                         f"images, or {DATA_REFERENCE!r}")
    stored = not storage.path(reference).is_dir() and bool(set(STAT_KEYS) & set(npz_keys(reference)))
    return reference, {"statistics": "stored" if stored else "computed from its images"}


def evaluate_from_config(
    config: Any, workdir: str, *, inception_image_size: int = IMAGE_SIZE
) -> tuple[dict[str, Any], str]:
    """`ldm-jax evaluate`: the metrics of the config's samples against its reference, written with
    the protocol to `<workdir>/evaluation.json` (atomically, by process 0). Returns (metrics, path).

    Fields (`config.evaluate`):
      samples: a samples `.npz` (`arr_0`) or a folder of images; "" = `<out_dir>/samples.npz` with
        out_dir = sample.out_dir or `<workdir>/samples` (what `ldm-jax sample` writes). The sampling
        `protocol.json` beside it (or in the folder) is copied into the results.
      reference: an ADM reference batch `.npz` (stored statistics and/or `arr_0`), a folder of images,
        or "data": every image of `config.data`'s source and split, center-cropped to
        data.image_size as training sees them (not flipped).
      inception_path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (never downloaded).
      batch_size: images per feature batch, a multiple of the mesh's devices (`config.mesh`).
      num_splits, k: Inception Score splits, precision/recall neighbours.
    inception_image_size: the side images are resized to before the network: 299 (pytorch-fid's, the
      protocol's); smaller sizes only serve tests of tiny networks. It is recorded in the JSON.

    Every metric is computed or none is: too few samples or reference images for one of them is a
    ValueError naming the count and the setting, raised before any feature is extracted (see
    `check_sample_counts`). The one null: precision / recall (and num_reference_images) when the
    reference stores only statistics, as in ADM's evaluator. Missing files raise FileNotFoundError,
    malformed ones ValueError, each naming the field and the file.
    """
    mesh_lib.initialize_distributed(config.distributed)
    settings = config.evaluate
    samples = _samples_path(config, workdir)
    reference, reference_protocol = _reference_from_config(config)
    module, params, inception_protocol = load_inception(settings.inception_path, image_size=inception_image_size)
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    if settings.batch_size < 1 or settings.batch_size % mesh.size:
        raise ValueError(f"evaluate.batch_size={settings.batch_size} must be a positive multiple of the mesh's "
                         f"{mesh.size} devices")
    extractor = InceptionFeatures(module, params, batch_size=settings.batch_size, mesh=mesh)
    results = evaluate(samples, reference, extractor, num_splits=settings.num_splits, k=settings.k)
    logging.info("evaluation of %s: %s", samples, results)
    path = storage.join(workdir, RESULTS_FILE)
    if jax.process_index() == 0:
        if isinstance(reference, str):
            reference_protocol.update(_fingerprint(reference))
        sampling_path, sampling_protocol = _sampling_protocol(samples)
        protocol = {
            "samples": _fingerprint(samples),
            "reference": reference_protocol,
            "inception": inception_protocol,
            "num_splits": settings.num_splits,
            "k": settings.k,
            "batch_size": settings.batch_size,
            "num_devices": mesh.size,
            "sampling_protocol_path": sampling_path,
            "sampling": sampling_protocol,
            "versions": {"ldm_jax": ldm_jax.__version__, "jax": jax.__version__, "numpy": np.__version__,
                         "scipy": scipy.__version__},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        storage.write_atomic(path, json.dumps({"metrics": results, "protocol": protocol}, indent=2,
                                              sort_keys=True).encode())
    return results, path
