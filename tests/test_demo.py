"""`ldm-jax demo` end to end (tiny stages, a real subprocess) and its classifier."""
import json
import subprocess
import sys

import numpy as np
import pytest

from ldm_jax import demo
from subprocesses import ROOT, cpu_env, load_config

DATA = load_config("demo_digits").dit_stage.data


@pytest.fixture(scope="module")
def classifier():
    return demo.digits_classifier(DATA)


def test_classifier_recognises_held_out_digits(classifier):
    _, held_out_accuracy = classifier
    assert held_out_accuracy >= 0.97


def test_conditional_accuracy_counts_intended_classes(classifier):
    model, _ = classifier
    images, labels = demo.preprocessed_digits(DATA, "test")
    accuracy, per_class = demo.conditional_accuracy(model, images, labels)
    assert accuracy >= 0.97 and min(per_class) >= 0.9
    shuffled, _ = demo.conditional_accuracy(model, images, np.roll(labels, 1))  # wrong intended classes
    assert shuffled < 0.3


@pytest.mark.slow
def test_demo_command_trains_both_stages_and_scores_samples(tmp_path):
    tiny = [
        "--config.vae_stage.train.num_steps=4", "--config.vae_stage.train.log_every=2",
        "--config.vae_stage.model.block_out_channels=(8,16)", "--config.vae_stage.model.norm_num_groups=4",
        "--config.dit_stage.train.num_steps=4", "--config.dit_stage.train.log_every=2",
        "--config.dit_stage.model.hidden_size=32", "--config.dit_stage.model.depth=1",
        "--config.dit_stage.sample.num_steps=2", "--config.dit_stage.sample.num_samples=40",
        "--config.dit_stage.sample.batch_size=40",
    ]
    command = [sys.executable, "-m", "ldm_jax.cli", "demo", "--config=configs/demo_digits.py",
               f"--workdir={tmp_path}", *tiny]
    result = subprocess.run(command, cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["num_samples"] == 40 and 0.0 <= summary["conditional_accuracy"] <= 1.0
    assert summary["classifier_held_out_accuracy"] >= 0.97
    assert (tmp_path / "vae" / "model" / "model.json").exists() and (tmp_path / "dit" / "model" / "model.json").exists()
    assert summary["grid"] in result.stdout and "recognises the intended digit" in result.stdout
    stages = [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("[")]
    assert stages == ["[1/3] KL-VAE", "[2/3] class-conditional DiT on its latents", "[3/3] sampling 40 digits (guidance 1.5) and scoring them"]
    terminal = result.stdout + result.stderr  # the parameter table and hyperparameters are in files only
    assert "| Name" not in terminal and "Hyperparameters" not in terminal
    assert "Total:" in (tmp_path / "vae" / "parameters.txt").read_text()
    assert open(summary["grid"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # A rerun trains nothing again: both stages are found exported.
    rerun = subprocess.run(command, cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("already trained") == 2
