"""The training loop in-process: non-finite losses and bad configs stop it early, naming why."""
import pytest

from ldm_jax.config import default_config
from ldm_jax.training import loop, nonfinite

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this module out


def _tiny_config(**train):
    train = dict(num_steps=3, log_every=1, checkpoint_every=1, preview_every=0) | train
    config = default_config()
    config.data.update(source="digits", image_size=8, batch_size=16, num_threads=1)
    config.model = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=4,
                        num_classes=10, learn_sigma=False)
    config.train.update(**train)
    return config


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    config = _tiny_config()
    config.optimizer.update(name="sgd", learning_rate=1e30)
    with pytest.raises(nonfinite.NonFiniteLossError, match=r"at step \d") as error:
        loop.train(config, str(tmp_path))
    assert "Latest good checkpoint" in str(error.value)


@pytest.mark.parametrize(
    "update, message",
    [
        (lambda c: c.mesh.update(data=3, fsdp=1, tensor=1), "must equal the number of devices"),
        (lambda c: c.data.update(batch_size=12), "data.batch_size=12"),
        (lambda c: c.optimizer.update(name="lion"), "optimizer.name='lion'"),
        (lambda c: c.model.update(remat=True, remat_policy="some"), "remat_policy"),
        (lambda c: c.train.update(num_steps=0), "train.num_steps=0"),
        (lambda c: c.update(task="gan"), "task='gan'"),
    ],
)
def test_bad_config_fails_before_compiling(tmp_path, update, message):
    config = _tiny_config()
    update(config)
    with pytest.raises(ValueError, match=message):
        loop.train(config, str(tmp_path))


def _saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_a_huge_learning_rate_never_reaches_a_checkpoint(tmp_path):
    config = _tiny_config()
    config.optimizer.update(learning_rate=1e39)  # AdamW: finite loss and gradients, non-finite parameters
    with pytest.raises(nonfinite.NonFiniteLossError, match=r"at step 1 .*No checkpoint was saved before it"):
        loop.train(config, str(tmp_path))
    assert _saved_steps(tmp_path) == []


@pytest.mark.parametrize(
    "update, named",
    [
        (lambda c: c.model.update(hidden_size=64), "model.hidden_size: 32 -> 64"),
        (lambda c: (c.diffusion.update(prediction="v"), c.data.update(batch_size=32)),
         "data.batch_size: 16 -> 32; diffusion.prediction: 'epsilon' -> 'v'"),
    ],
)
def test_a_restart_with_another_config_is_refused_and_force_new_moves_the_old_run_aside(tmp_path, update, named):
    loop.train(_tiny_config(num_steps=2), str(tmp_path))
    changed = _tiny_config(num_steps=3)  # training longer is the same run; the update is not
    update(changed)
    with pytest.raises(loop.OtherRunError, match=named):
        loop.train(changed, str(tmp_path))
    assert _saved_steps(tmp_path) == [1, 2]
    changed.train.force_new = True
    loop.train(changed, str(tmp_path))
    assert _saved_steps(tmp_path) == [1, 2, 3]
    (old_run,) = tmp_path.glob("checkpoints.replaced-*")
    assert sorted(int(p.name) for p in old_run.iterdir() if p.name.isdigit()) == [1, 2]


def test_unreadable_checkpoints_are_refused(tmp_path):
    loop.train(_tiny_config(num_steps=1), str(tmp_path))
    for path in (tmp_path / "checkpoints" / "1" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"no checkpoint .* can be restored: step 1: .*force_new"):
        loop.train(_tiny_config(num_steps=2), str(tmp_path))
    assert _saved_steps(tmp_path) == [1]


def test_a_new_run_records_its_parameters_in_the_workdir_not_the_terminal(tmp_path, caplog):
    with caplog.at_level("INFO"):
        loop.train(_tiny_config(num_steps=1), str(tmp_path))
    table = (tmp_path / "parameters.txt").read_text()
    assert "blocks_0/adaLN_modulation/linear/kernel" in table and "Total:" in table
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "parameters (table: " in logged
    assert "blocks_0/adaLN_modulation" not in logged and "Hyperparameters" not in logged
    assert list(tmp_path.glob("events.out.tfevents.*")), "the hyperparameters go to TensorBoard"
