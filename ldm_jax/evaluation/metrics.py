"""Sample-quality metrics from Inception features: FID / sFID, Inception Score, precision / recall.

Conventions are those of ADM's evaluation suite (guided-diffusion `evaluations/evaluator.py`),
which DiT and LDM report:
- statistics: mean and `np.cov(rowvar=False)` (unbiased) in float64;
- Frechet distance: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)) with `scipy.linalg.sqrtm`;
  if the product's square root is not finite, eps (1e-6) is added to both diagonals and it is
  retried (pytorch-fid / TTUR / ADM); a tiny imaginary part from rounding is dropped, a large one
  (|imag| > 1e-3 on the diagonal) is an error;
- Inception Score: softmax over all 1008 UNBIASED logits (pool features @ fc weights, no bias:
  improved-GAN's, ADM's and torch-fidelity's convention -- the TF graph's `softmax/logits/MatMul`),
  split into `num_splits` consecutive parts (10; improved-GAN's bounds i*N//splits, which are ADM's
  5,000-image chunks for its 50,000 samples), exp(mean KL(p(y|x) || p(y))) per part; the mean and
  std over parts. Computed in float64 from log-softmax, so a probability that underflows to 0
  contributes 0 instead of NaN;
- precision / recall (Kynkaenniemi et al. 2019, ADM's `ManifoldEstimator`, k = 3): the radius of a
  point is its (squared) distance to its k-th nearest neighbour within its own set (itself not
  counted); precision = fraction of samples inside some reference ball (distance <= radius),
  recall = fraction of references inside some sample ball. Squared distances
  |u|^2 - 2 u.v + |v|^2 (clipped at 0) are computed in float32 blocks with JAX at full matmul
  precision (ADM tries float16 first); memory stays O(block^2).
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

FID_EPS = 1e-6
IS_SPLITS = 10
PR_NEIGHBOURS = 3
PR_BLOCK = 4096


def _as_features(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{name}: expected features [N, D], got shape {features.shape}")
    return features


def feature_statistics(features: np.ndarray, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mu [D], sigma [D, D]), float64; sigma is the unbiased covariance."""
    features = _as_features(features, name)
    if len(features) < 2:
        raise ValueError(f"{name}: a covariance needs at least 2 samples, got {len(features)}")
    features = features.astype(np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = FID_EPS
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): mu [D], sigma [D, D]."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"Frechet distance: statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm(sigma1 @ sigma2) is not finite (singular product); adding {eps} to the diagonals")
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, num_splits: int = IS_SPLITS) -> tuple[float, float]:
    """logits [N, C] (unbiased Inception logits) -> (mean, std) of the Inception Score over splits.

    Needs at least 2 samples per split.
    """
    logits = _as_features(logits, "Inception Score logits").astype(np.float64)
    n = len(logits)
    if num_splits < 1 or n < 2 * num_splits:
        raise ValueError(
            f"Inception Score: {n} samples cannot be split into num_splits={num_splits} parts of at "
            "least 2 samples"
        )
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for i in range(num_splits):
        part = log_p[i * n // num_splits : (i + 1) * n // num_splits]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0))
        scores.append(np.exp(np.mean(np.sum(p * (part - log_marginal), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


@jax.jit
def _squared_distances(u: jax.Array, v: jax.Array) -> jax.Array:
    """[n, D], [m, D] -> [n, m] squared Euclidean distances (ADM's expansion, clipped at 0)."""
    uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(u * u, axis=1)[:, None] - 2 * uv + jnp.sum(v * v, axis=1)[None, :]
    return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _smallest(u: jax.Array, v: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """The k smallest squared distances of each row of u to the valid rows of v: [n, k]."""
    d = jnp.where(valid[None, :], _squared_distances(u, v), jnp.inf)
    return -jax.lax.top_k(-d, k)[0]


@jax.jit
def _inside(u: jax.Array, radii_u: jax.Array, v: jax.Array, radii_v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For blocks u [n, D], v [m, D] with radii [n], [m]: which u lie in some ball of v ([n] bool)
    and which v lie in some ball of u ([m] bool). Padding rows have radius -inf (no ball)."""
    d = _squared_distances(u, v)
    return jnp.any(d <= radii_v[None, :], axis=1), jnp.any(d <= radii_u[:, None], axis=0)


def _pad_rows(x: np.ndarray, multiple: int, fill: float) -> np.ndarray:
    """x [N, ...] -> [ceil(N / multiple) * multiple, ...], new rows set to `fill`."""
    extra = -len(x) % multiple
    return np.concatenate([x, np.full((extra,) + x.shape[1:], fill, x.dtype)])


def manifold_radii(features: np.ndarray, k: int = PR_NEIGHBOURS, block: int = PR_BLOCK) -> np.ndarray:
    """features [N, D] -> [N] squared distance of each point to its k-th nearest other point."""
    features = _as_features(features, "precision/recall features")
    n = len(features)
    if n < k + 1:
        raise ValueError(f"precision/recall: the k={k}-th nearest neighbour needs at least {k + 1} samples, got {n}")
    block = min(block, n)
    padded = jnp.asarray(_pad_rows(features.astype(np.float32), block, 0.0))
    valid = jnp.arange(len(padded)) < n
    radii = []
    for r in range(0, len(padded), block):
        rows = padded[r : r + block]
        nearest = [
            _smallest(rows, padded[c : c + block], valid[c : c + block], min(k + 1, block))
            for c in range(0, len(padded), block)
        ]
        # Column k of the k + 1 smallest: the point itself (distance 0) is column 0.
        radii.append(np.partition(np.concatenate([np.asarray(x) for x in nearest], axis=1), k, axis=1)[:, k])
    return np.concatenate(radii)[:n]


def precision_recall(
    reference: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURS, block: int = PR_BLOCK
) -> tuple[float, float]:
    """(precision, recall) of samples [N, D] against reference features [M, D] (ADM semantics)."""
    reference = _as_features(reference, "precision/recall reference features")
    samples = _as_features(samples, "precision/recall sample features")
    if reference.shape[1] != samples.shape[1]:
        raise ValueError(f"precision/recall: feature sizes differ: {reference.shape[1]} vs {samples.shape[1]}")
    sets = []
    for features in (reference, samples):
        size = min(block, len(features))
        radii = _pad_rows(manifold_radii(features, k, block), size, -np.inf)
        sets.append((size, jnp.asarray(_pad_rows(features.astype(np.float32), size, 0.0)), jnp.asarray(radii)))
    (ref_block, ref, ref_radii), (sam_block, sam, sam_radii) = sets
    ref_in = np.zeros(len(ref), bool)
    sam_in = np.zeros(len(sam), bool)
    for r in range(0, len(ref), ref_block):
        for s in range(0, len(sam), sam_block):
            r_in, s_in = _inside(ref[r : r + ref_block], ref_radii[r : r + ref_block], sam[s : s + sam_block], sam_radii[s : s + sam_block])
            ref_in[r : r + ref_block] |= np.asarray(r_in)
            sam_in[s : s + sam_block] |= np.asarray(s_in)
    return float(sam_in[: len(samples)].mean()), float(ref_in[: len(reference)].mean())
