"""`ldm-jax demo`: latent diffusion end to end on the bundled digits (configs/demo_digits.py).

    summary = run(config, workdir)

  1. `<workdir>/vae`: train the config's `vae_stage` (a KL-VAE), exported to `<workdir>/vae/model`.
  2. `<workdir>/dit`: train the `dit_stage` (a class-conditional DiT) on that VAE's latents.
  3. `<workdir>/dit/samples`: a grid PNG (row r = digit r) and `dit_stage.sample.num_samples`
     class-balanced samples (`ldm-jax sample`).
  4. A digits classifier (scikit-learn SVM on the training split, preprocessed exactly as the models
     see it) labels the samples: the fraction labelled with their intended class is the demo's
     score, shown beside the classifier's own accuracy on the held-out split; the Frechet distance of
     the samples to the held-out digits (in their native 8x8 grey levels) is shown beside that of
     the real training digits, so diversity lost to guidance shows too.
A stage whose exported model exists is not trained again, so a rerun resumes at the first
unfinished stage (and an interrupted stage resumes from its checkpoint). `workdir` may be a gs:// URI.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np

from ldm_jax import storage
from ldm_jax.data import pipeline, transforms
from ldm_jax.evaluation import metrics
from ldm_jax.inference import sampling
from ldm_jax.training import loop

STAGES = ("vae_stage", "dit_stage")


def _validate(config: Any) -> None:
    missing = [s for s in STAGES if s not in config]
    if missing:
        raise ValueError(f"demo: the config needs sections {list(STAGES)}; missing {missing}")
    if config.vae_stage.task != "autoencoder" or config.dit_stage.task != "diffusion":
        raise ValueError("demo: vae_stage.task must be 'autoencoder' and dit_stage.task 'diffusion'")
    if config.dit_stage.sample.num_samples < 1:
        raise ValueError("demo: dit_stage.sample.num_samples must be >= 1 (the samples the classifier labels)")


def _train_stage(config: Any, workdir: str, stage: str) -> str:
    """Trains `config` in `workdir` unless its model is exported already; -> the model bundle path."""
    model = storage.join(workdir, "model")
    if storage.path(model).joinpath("model.json").is_file():
        print(f"{stage}: {model} exists, already trained", flush=True)
    else:
        print(f"{stage}: {config.train.num_steps} steps in {workdir} (log lines below)", flush=True)
        loop.train(config, workdir)
    return model


def preprocessed_digits(data_config: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The digits of `split` as the models see them: uint8 [N, S, S, 3] (S = data.image_size), labels [N]."""
    data = pipeline.resolve_config(copy.deepcopy(data_config))
    with data.unlocked():
        data.split = split
    source = pipeline.make_source(data)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([transforms.center_crop_arr(transforms.to_pil_rgb(e["image"]), data.image_size) for e in examples])
    return images, np.array([e["label"] for e in examples])


def _classifier_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] -> grey levels in [0, 1], [N, S * S]."""
    return images.astype(np.float32).mean(axis=-1).reshape(len(images), -1) / 255.0


def digits_classifier(data_config: Any) -> tuple[Any, float]:
    """An SVM fitted on the preprocessed training split -> (classifier, held-out accuracy)."""
    from sklearn.svm import SVC  # pylint: disable=g-import-not-at-top

    train_images, train_labels = preprocessed_digits(data_config, "train")
    test_images, test_labels = preprocessed_digits(data_config, "test")
    classifier = SVC(C=10.0, gamma="scale").fit(_classifier_features(train_images), train_labels)
    return classifier, float(np.mean(classifier.predict(_classifier_features(test_images)) == test_labels))


def conditional_accuracy(classifier: Any, images: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """How often the classifier recognises the intended class: overall and per class [0..9]."""
    correct = classifier.predict(_classifier_features(images)) == labels
    per_class = [float(np.mean(correct[labels == c])) if np.any(labels == c) else float("nan") for c in range(10)]
    return float(np.mean(correct)), per_class


def _native_grey(images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] -> grey levels in [0, 1] at the digits' native 8x8 (area average), [N, 64]."""
    grey = images.astype(np.float64).mean(axis=-1) / 255.0
    n, size = grey.shape[0], grey.shape[1]
    return grey.reshape(n, 8, size // 8, 8, size // 8).mean(axis=(2, 4)).reshape(n, 64)


def digits_frechet_distance(images: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance between two sets of digit images [N, S, S, 3] (S a multiple of 8) in the
    digits' own 64-D space (8x8 grey levels in [0, 1]): a distribution-level score, which guidance
    that buys accuracy with diversity makes worse."""
    return metrics.frechet_distance(*metrics.feature_statistics(_native_grey(images), "samples"),
                                    *metrics.feature_statistics(_native_grey(reference), "reference"))


def score_samples(images: np.ndarray, labels: np.ndarray, data_config: Any) -> dict[str, Any]:
    """Class-conditional samples (uint8 [N, S, S, 3], intended labels [N]) scored against the digits:
    the classifier's accuracy on them and on held-out real digits, and the Frechet distance of the
    samples to the held-out digits beside that of as many real training digits (the first N)."""
    classifier, held_out_accuracy = digits_classifier(data_config)
    accuracy, per_class = conditional_accuracy(classifier, images, labels)
    train_images, _ = preprocessed_digits(data_config, "train")
    test_images, _ = preprocessed_digits(data_config, "test")
    return {
        "num_samples": int(len(labels)),
        "conditional_accuracy": accuracy,
        "conditional_accuracy_per_class": per_class,
        "classifier_held_out_accuracy": held_out_accuracy,
        "frechet_distance": digits_frechet_distance(images, test_images),
        "frechet_distance_real_train": digits_frechet_distance(train_images[:len(images)], test_images),
    }


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Runs the demo in `workdir`; returns (and writes to `<workdir>/demo.json`) its summary."""
    _validate(config)
    vae_model = _train_stage(config.vae_stage, storage.join(workdir, "vae"), "[1/3] KL-VAE")
    dit_config = copy.deepcopy(config.dit_stage)
    dit_config.vae.path = vae_model
    dit_workdir = storage.join(workdir, "dit")
    dit_model = _train_stage(dit_config, dit_workdir, "[2/3] class-conditional DiT on its latents")
    print(f"[3/3] sampling {dit_config.sample.num_samples} digits (guidance {dit_config.sample.guidance_scale:g}) "
          "and scoring them", flush=True)
    outputs = sampling.sample_from_config(dit_config, dit_workdir)
    with storage.path(outputs["samples"]).open("rb") as f, np.load(f) as samples:
        images, labels = samples["arr_0"], samples["arr_1"]
    summary = {"grid": outputs["grid"], "samples": outputs["samples"], **score_samples(images, labels, dit_config.data)}
    summary_path = storage.join(workdir, "demo.json")
    storage.write_atomic(summary_path, json.dumps(summary, indent=2).encode())
    print(f"sample grid (row r = digit r): {summary['grid']}")
    print(f"a digits classifier recognises the intended digit in {summary['conditional_accuracy']:.1%} of "
          f"{len(labels)} samples (its accuracy on held-out real digits: {summary['classifier_held_out_accuracy']:.1%}); "
          "per digit: " + " ".join(f"{c}:{a:.0%}" for c, a in enumerate(summary["conditional_accuracy_per_class"])))
    print(f"Frechet distance to held-out digits (8x8 grey levels): samples {summary['frechet_distance']:.3f}, "
          f"real training digits {summary['frechet_distance_real_train']:.3f} (lower is closer)")
    print(f"models: {vae_model}, {dit_model}; summary: {summary_path}")
    return summary
