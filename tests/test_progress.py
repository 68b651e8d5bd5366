"""Progress bars (ldm_jax/progress.py): drawn on a terminal or with LDM_JAX_PROGRESS=1, never in a
pipe unless asked, counting the work of `sample` and `evaluate` (encode and convert: tests/test_cli.py)."""
import numpy as np
import pytest

from ldm_jax import progress
from ldm_jax.inference import sampling
from test_fid import extractor, tiny_params  # noqa: F401 - fixtures
from test_sampling import _config, bundle  # noqa: F401 - fixtures


@pytest.mark.parametrize("setting, tty, shown", [("1", False, True), ("0", True, False), ("", True, True),
                                                 ("", False, False)])
def test_bars_are_shown_on_a_terminal_or_when_asked(monkeypatch, setting, tty, shown):
    monkeypatch.setenv(progress.ENV, setting)
    monkeypatch.setattr("sys.stderr.isatty", lambda: tty)
    assert progress.shown() is shown


def test_evaluate_features_count_every_image(extractor, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv(progress.ENV, "1")
    images = np.zeros((13, 32, 32, 3), np.uint8)
    extractor.extract([images[:8], images[8:]], total=13, name="samples")
    err = capsys.readouterr().err
    assert "Inception features of samples: 100%" in err and "13/13" in err, err[-2000:]


def test_sample_counts_the_samples_it_draws(bundle, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv(progress.ENV, "1")
    sampling.sample_from_config(_config(tmp_path, bundle[0], num_samples=16, num_steps=4), str(tmp_path))
    err = capsys.readouterr().err
    assert "sample: 100%" in err and "16/16" in err, err[-2000:]
    monkeypatch.setenv(progress.ENV, "0")
    sampling.sample_from_config(_config(tmp_path / "again", bundle[0], num_samples=8, num_steps=4), str(tmp_path / "again"))
    assert "sample:" not in capsys.readouterr().err
