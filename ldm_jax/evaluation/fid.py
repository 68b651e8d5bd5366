"""Evaluating samples against an ADM reference batch: FID, sFID, Inception Score, precision/recall.

    module, params = inception_from_pytorch_fid(".../pt_inception-2015-12-05-6726825d.pth")
    extractor = InceptionFeatures(module, params, batch_size=64, mesh=mesh)
    results = evaluate("samples.npz", "VIRTUAL_imagenet256_labeled.npz", extractor)  # a JSON-able dict

Reference batches are ADM's `.npz` files: `mu` [2048], `sigma` [2048, 2048] (pool features),
`mu_s` [2023], `sigma_s` [2023, 2023] (spatial features), and/or `arr_0`, uint8 images
[M, H, W, 3]. As in ADM's evaluator, stored statistics are used when present, else computed from
`arr_0`; precision/recall need the reference images (their pool features), so they are null when
the file has none. Samples are a `.npz` with `arr_0` (uint8 [N, H, W, 3]) or a folder of images.

ADM computed its stored statistics with TF's graph, which resizes inside the graph with TF's own
bilinear kernel and normalises as (x - 128) / 128; pytorch-fid's preprocessing, which
`InceptionV3` follows, differs slightly, so numbers against stored statistics carry the same small
offset as pytorch-fid's numbers.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ldm_jax.evaluation import metrics
from ldm_jax.evaluation.features import InceptionFeatures, npz_image_batches, npz_keys, read_images

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IMAGES_KEY = "arr_0"


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
    with np.load(path) as data:
        for key, shape in _expected_shapes(pool_dim, spatial_dim).items():
            value = data[key]
            if value.shape != shape or value.dtype.kind != "f":
                raise ValueError(f"{path}: reference {key!r} must be a float array of shape {shape}, got {value.dtype} {value.shape}")
            stats[key] = value.astype(np.float64)
    return stats


def evaluate(
    samples: str,
    reference: str,
    extractor: InceptionFeatures,
    *,
    num_splits: int = metrics.IS_SPLITS,
    k: int = metrics.PR_NEIGHBOURS,
) -> dict[str, Any]:
    """FID, sFID, Inception Score (mean, std), precision and recall of `samples` (a `.npz` with
    `arr_0` or an image folder) against the ADM reference batch `reference`, as a JSON-serialisable
    dict of floats / ints / None."""
    if not (reference.endswith(".npz") and os.path.isfile(reference)):
        raise ValueError(f"reference={reference!r} must be an existing ADM reference batch .npz")
    sample_acts = extractor.extract(read_images(samples, extractor.batch_size))
    pool_dim, spatial_dim = sample_acts["pool"].shape[1], sample_acts["spatial"].shape[1]
    ref_stats = load_reference_statistics(reference, pool_dim, spatial_dim)
    has_images = IMAGES_KEY in npz_keys(reference)
    if ref_stats is None and not has_images:
        raise ValueError(f"{reference}: a reference batch needs {list(STAT_KEYS)} or images {IMAGES_KEY!r}")
    ref_acts = extractor.extract(npz_image_batches(reference, extractor.batch_size)) if has_images else None
    if ref_stats is None:
        ref_stats = statistics(ref_acts)
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
