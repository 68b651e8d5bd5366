"""`train.nonfinite` on real bad data: a latent cache in which a few records hold NaN/inf latents, so
that the steps whose batches hold them have a non-finite loss ("stop", "skip", "rollback", and the
limit `train.nonfinite_max`), through `ldm-jax train` as a user runs it."""
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.data import latent_cache, sources
from subprocesses import ROOT, assert_bitwise_equal, checkpoint_state, cpu_env, run_train, train_command

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this module out

BATCH = 16
# Unshuffled, step k reads examples [16 (k - 1), 16 k): one bad record in each of steps 6, 7 and 11.
BAD_EXAMPLES = {5 * BATCH + 3, 6 * BATCH + 9, 10 * BATCH}
BAD_STEPS = (6, 7, 11)


class _Blacked:
    """The digits with the bad examples' images all black (the encoder below turns those into bad latents)."""

    def __init__(self, source):
        self._source = source

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        example = dict(self._source[index])
        if index in BAD_EXAMPLES:
            example["image"] = np.zeros_like(example["image"])
        return example


def _encode(images):
    """A stand-in VAE encoder: 2x2-pooled pixels through a fixed linear map -> 4 channels (mean), std 0.1;
    an all-black image (a bad example of `_Blacked`) -> NaN means, which the cache stores as they are."""
    b, h, w, _ = images.shape
    pooled = images.reshape(b, h // 2, 2, w // 2, 2, 3).mean(axis=(2, 4))
    mean = pooled @ jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
    black = jnp.all(images <= -1.0, axis=(1, 2, 3))
    return jnp.where(black[:, None, None, None], jnp.nan, mean), jnp.full_like(mean, 0.1)


@pytest.fixture(scope="module")
def bad_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_latents")
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    latent_cache.cache_latents(_Blacked(sources.DigitsSource("test")), _encode, str(out), image_size=8,
                               downsample_factor=2, batch_size=BATCH, sharding=sharding, flip=False, shard_size=128)
    cache = sources.LatentSource(str(out))
    for index in BAD_EXAMPLES:  # the bad data is really in the records that training reads
        assert not np.isfinite(cache[index]["mean"]).all()
    assert np.isfinite(cache[0]["mean"]).all() and np.isfinite(cache[BATCH * 12]["mean"]).all()
    return out


def _overrides(cache, *extra):
    return ["--config.data.source=latents", f"--config.data.path={cache}", "--config.data.latent_norm=scale",
            "--config.data.shuffle=False", "--config.data.random_flip=False", "--config.model.input_size=4",
            "--config.model.in_channels=4", "--config.train.checkpoint_every=4", "--config.train.num_steps=12",
            *extra]


def _fails(workdir, *overrides):
    """The last stderr line of a `train` that must fail."""
    result = subprocess.run(train_command(workdir, *overrides), cwd=ROOT, env=cpu_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode != 0, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def _saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _logged(stderr, name):
    """{step: value} of one scalar in clu's log lines ('[12] a=1, nonfinite_skipped=3, ...')."""
    return {int(step): float(value) for step, value in re.findall(rf"\[(\d+)\][^\n]*\b{name}=([-\d.e+]+)", stderr)}


def _assert_finite(tree):
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]
    assert all(np.isfinite(leaf).all() for leaf in leaves if leaf.dtype.kind == "f")


def test_stop_names_the_first_bad_step(bad_cache, tmp_path):
    line = _fails(tmp_path, *_overrides(bad_cache))  # nonfinite="stop" is the default
    assert line.startswith("ldm-jax train: error: NonFiniteLossError: non-finite loss"), line
    assert "at step 6 " in line and "Latest good checkpoint: step 4" in line
    assert _saved_steps(tmp_path) == [4]  # nothing saved after the bad step
    assert not (tmp_path / "model").exists()


def test_skip_counts_the_skipped_steps_and_resumes_bit_exact(bad_cache, tmp_path):
    skip = _overrides(bad_cache, "--config.train.nonfinite=skip", "--config.train.nonfinite_max=2")
    straight = run_train(tmp_path / "straight", *skip)
    state = checkpoint_state(tmp_path / "straight", 12)
    assert int(state["step"]) == 12 - len(BAD_STEPS)  # updates applied
    _assert_finite(state)
    assert _logged(straight.stderr, "nonfinite_skipped") == {4: 0.0, 8: 2.0, 12: 3.0}
    assert (tmp_path / "straight" / "model").exists()
    # Stopped after step 8 (mid-way, with skips behind it), then resumed: the same bits as straight.
    run_train(tmp_path / "resumed", *skip, "--config.train.num_steps=8")
    resumed = run_train(tmp_path / "resumed", *skip)
    assert _logged(resumed.stderr, "nonfinite_skipped") == {12: 3.0}
    assert_bitwise_equal(checkpoint_state(tmp_path / "resumed", 12), state)


def test_skip_stops_after_more_than_nonfinite_max_in_a_row(bad_cache, tmp_path):
    line = _fails(tmp_path, *_overrides(bad_cache, "--config.train.nonfinite=skip", "--config.train.nonfinite_max=1"))
    assert "NonFiniteLossError" in line and "at steps 6..7, more than train.nonfinite_max=1 in a row" in line, line
    assert _saved_steps(tmp_path) == [4]


def test_rollback_restores_the_checkpoint_and_goes_on_past_the_bad_batches(bad_cache, tmp_path):
    result = run_train(tmp_path, *_overrides(bad_cache, "--config.train.nonfinite=rollback",
                                             "--config.train.nonfinite_max=3"))
    # Step 6 (batch 6) is bad: back to step 4 with batches 9..; step 7 then reads batch 11, bad: back to
    # step 4 again with batches 13..; from there every batch is good.
    assert result.stderr.count("rolled back to step 4") == 2, result.stderr[-3000:]
    assert "non-finite step 6: rolled back to step 4 (rollback 1 in a row)" in result.stderr
    assert "non-finite step 7: rolled back to step 4 (rollback 2 in a row)" in result.stderr
    state = checkpoint_state(tmp_path, 12)
    assert int(state["step"]) == 12  # every step of the finished run was applied
    _assert_finite(state)
    assert _logged(result.stderr, "nonfinite_rollbacks")[12] == 2.0
    assert (tmp_path / "model").exists()


def test_rollback_stops_after_more_than_nonfinite_max_in_a_row(bad_cache, tmp_path):
    line = _fails(tmp_path, *_overrides(bad_cache, "--config.train.nonfinite=rollback",
                                        "--config.train.nonfinite_max=1"))
    assert "at step 7 " in line and "after 1 rollbacks in a row (train.nonfinite_max=1)" in line, line
    assert _saved_steps(tmp_path) == [4]


def test_a_bad_policy_is_one_line(tmp_path):
    line = _fails(tmp_path, "--config.train.nonfinite=ignore")
    assert line == "ldm-jax train: error: ValueError: train.nonfinite='ignore': allowed values are " \
                   "('stop', 'skip', 'rollback')", line
