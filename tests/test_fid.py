"""FID / sFID, Inception Score, precision/recall, batched feature extraction and reference batches."""
import json

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from ldm_jax.convert.inception import inception_from_pytorch_fid
from ldm_jax.evaluation import fid, metrics
from ldm_jax.evaluation.features import InceptionFeatures, npz_image_batches, open_images
from ldm_jax.models.inception import InceptionV3
from ldm_jax.parallel import mesh as mesh_lib

# ----------------------------------------------------------------------------- Frechet distance


def frechet_by_eigenvalues(mu1, s1, mu2, s2):
    """Independent float64 reference: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
    w, v = linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.clip(linalg.eigvalsh(root @ s2 @ root), 0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig)))


@pytest.mark.parametrize("n, d", [(300, 16), (12, 32)])  # full-rank and singular covariances
def test_frechet_distance_matches_independent_scipy(n, d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + 0.2
    (mu1, s1), (mu2, s2) = metrics.feature_statistics(a), metrics.feature_statistics(b)
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    ref = frechet_by_eigenvalues(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-6


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_adds_eps_when_sqrtm_is_not_finite():
    # sqrtm of this singular product returns inf: the ADM / pytorch-fid fallback adds 1e-6 * I.
    s1 = np.array([[4.0, -2.0, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    s2 = np.array([[4.0, 2.0, 4.0], [2.0, 5.0, -2.0], [4.0, -2.0, 8.0]])
    mu1, mu2 = np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 5.0])
    assert not np.isfinite(linalg.sqrtm(s1 @ s2)).all()
    with pytest.warns(UserWarning, match="adding 1e-06"):
        ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    offset = 1e-6 * np.eye(3)
    assert abs(ours - frechet_by_eigenvalues(mu1, s1 + offset, mu2, s2 + offset) + 2 * 3e-6) < 1e-9
    assert abs(ours - (5 + 5 + 17 - 2 * np.sqrt(13))) < 1e-2  # the exact value, up to the eps offset


def test_statistics_need_two_samples_and_matching_shapes():
    mu, sigma = metrics.feature_statistics(np.arange(12.0).reshape(4, 3))
    np.testing.assert_allclose(sigma, np.cov(np.arange(12.0).reshape(4, 3), rowvar=False))
    assert mu.dtype == sigma.dtype == np.float64
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        metrics.feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.frechet_distance(mu, sigma, mu[:2], sigma[:2, :2])


# ----------------------------------------------------------------------------- Inception Score


def inception_score_adm(logits, split_size):
    """ADM's compute_inception_score on softmax(logits), in float64."""
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_matches_adm():
    logits = np.random.default_rng(0).normal(size=(200, 1008)) * 3
    mean, std = metrics.inception_score(logits)
    assert abs(mean - inception_score_adm(logits, 20)) < 1e-12
    assert std > 0


def test_inception_score_limits():
    confident = np.tile(100.0 * np.eye(5), (10, 1))  # each split holds every class once
    assert metrics.inception_score(confident) == pytest.approx((5.0, 0.0), abs=1e-9)
    assert metrics.inception_score(np.zeros((40, 7))) == pytest.approx((1.0, 0.0))
    with pytest.raises(ValueError, match="19 samples cannot be split into num_splits=10"):
        metrics.inception_score(np.zeros((19, 7)))


# ----------------------------------------------------------------------------- precision / recall


def precision_recall_brute_force(ref, sam, k):
    """Kynkaanniemi et al. with float64 distances: a point's radius is its k-th nearest other point."""
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    cross = np.sqrt(((sam[:, None] - ref[None]) ** 2).sum(-1))  # [N_sam, N_ref]
    precision = np.mean(np.any(cross <= radii(ref)[None, :], axis=1))
    recall = np.mean(np.any(cross <= radii(sam)[:, None], axis=0))
    return precision, recall


@pytest.mark.parametrize("block", [16, 4096])  # several padded blocks / one block
def test_precision_recall_matches_brute_force(block):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(70, 8)).astype(np.float32)
    sam = (rng.normal(size=(50, 8)) * 1.3 + 0.3).astype(np.float32)
    ours = metrics.precision_recall(ref, sam, k=3, block=block)
    assert ours == precision_recall_brute_force(ref.astype(np.float64), sam.astype(np.float64), 3)
    assert 0.3 < ours[0] < 1 and 0.3 < ours[1] < 1  # neither trivially 0 nor 1


def test_manifold_radii_and_sample_count():
    points = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    np.testing.assert_allclose(metrics.manifold_radii(points, k=3, block=2), [36.0, 25.0, 9.0, 25.0, 81.0])
    with pytest.raises(ValueError, match="k=3-th nearest neighbour needs at least 4 samples, got 3"):
        metrics.precision_recall(points[:3], points, k=3)


# ----------------------------------------------------------------------------- features + evaluate


TINY_75 = dict(width_divisor=16, num_classes=63, image_size=75)  # 3x3x7 spatial features


@pytest.fixture(scope="module")
def tiny_params(fixtures_dir):
    """The fixture network's params (they do not depend on the input size)."""
    return inception_from_pytorch_fid(fixtures_dir / "inception_fid_tiny.pth", width_divisor=16, num_classes=63)[1]


@pytest.fixture(scope="module")
def extractor(tiny_params):
    """Batches of 8 split over the 8 test devices (mesh data=4 x fsdp=2)."""
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    return InceptionFeatures(InceptionV3(**TINY_75), tiny_params, batch_size=8, mesh=mesh)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)


def test_sharded_features_match_one_device(extractor, tiny_params, images):
    module = InceptionV3(**TINY_75)
    direct = jax.jit(module.apply)({"params": tiny_params}, images[:5].astype(np.float32) / 255)
    sharded = extractor.extract([images[:3], images[3:5]])  # short batches are padded
    single = InceptionFeatures(module, tiny_params, batch_size=5)(images[:5])
    for key, value in direct.items():  # other batch sizes / layouts: rounding differs slightly
        scale = np.max(np.abs(np.asarray(value)))
        np.testing.assert_allclose(sharded[key], np.asarray(value), rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(single[key], np.asarray(value), rtol=0, atol=1e-5 * scale)
    assert sharded["spatial"].shape == (5, 3 * 3 * 7)
    with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of the 8 devices"):
        InceptionFeatures(module, tiny_params, batch_size=6, mesh=extractor.mesh)
    with pytest.raises(ValueError, match="uint8"):
        extractor(images[:2].astype(np.float32))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 24 samples, 63-dim sFID features
def test_evaluate_against_itself_and_stored_statistics(extractor, images, tmp_path):
    samples, reference = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=images)
    np.savez(reference, arr_0=images[::-1])
    results = fid.evaluate(str(samples), str(reference), extractor)
    json.dumps(results)
    assert results["num_samples"] == results["num_reference_images"] == 24
    assert abs(results["fid"]) < 1e-6 and abs(results["sfid"]) < 1e-6  # the same images
    assert results["precision"] == results["recall"] == 1.0

    acts = extractor.extract(npz_image_batches(str(samples), 8))
    assert results["inception_score"] == metrics.inception_score(acts["logits_unbiased"])[0]

    stats = fid.statistics(extractor.extract(np.split(images // 2 + 10, 3)))
    fid.write_reference_npz(str(tmp_path / "stats.npz"), stats)
    from_stats = fid.evaluate(str(samples), str(tmp_path / "stats.npz"), extractor)
    assert from_stats["precision"] is None and from_stats["num_reference_images"] is None
    sample_stats = fid.statistics(acts)
    expected = metrics.frechet_distance(sample_stats["mu"], sample_stats["sigma"], stats["mu"], stats["sigma"])
    assert from_stats["fid"] == expected > 1.0


def test_folder_of_images_reads_like_the_npz(extractor, images, tmp_path):
    for i, image in enumerate(images[:10]):
        Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
    folder = open_images(str(tmp_path))
    assert folder.num_images == 10
    batches = list(folder.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images[:10])
    Image.fromarray(images[0, :16]).save(tmp_path / "999.png")
    with pytest.raises(ValueError, match="999.png is"):
        list(open_images(str(tmp_path)).batches(4))
    with pytest.raises(ValueError, match="neither a folder of images nor an existing .npz"):
        open_images(str(tmp_path / "missing.npz"))


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(mu=np.zeros(128), sigma=np.zeros((128, 127)), mu_s=np.zeros(63), sigma_s=np.zeros((63, 63))),
         r"reference 'sigma' must be a float array of shape \(128, 128\)"),
        (dict(mu=np.zeros(128, np.int64), sigma=np.zeros((128, 128)), mu_s=np.zeros(63), sigma_s=np.zeros((63, 63))),
         r"reference 'mu' must be a float array of shape \(128,\), got int64"),
        (dict(mu=np.zeros(128), sigma=np.zeros((128, 128))), r"\['mu_s', 'sigma_s'\] are missing"),
        (dict(arr_0=np.zeros((4, 32, 32, 3), np.float32)), r"'arr_0' must be uint8 images"),
        (dict(images=np.zeros((4, 32, 32, 3), np.uint8)), r"needs \['mu', 'sigma', 'mu_s', 'sigma_s'\] or images"),
    ],
)
def test_bad_reference_batches_are_named(extractor, images, tmp_path, arrays, match):
    np.savez(tmp_path / "samples.npz", arr_0=images)
    np.savez(tmp_path / "ref.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        fid.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), extractor)


def test_too_few_samples_are_named(extractor, images, tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=images[:12])
    np.savez(tmp_path / "ref.npz", arr_0=images)
    with pytest.raises(ValueError, match="12 samples are too few for the Inception Score in num_splits=10"):
        fid.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), extractor)
