"""The training loop in-process: non-finite losses and bad configs stop it early, naming why."""
import pytest

from ldm_jax.config import default_config
from ldm_jax.training import loop


def _tiny_config(**train):
    config = default_config()
    config.data.update(source="digits", image_size=8, batch_size=16, num_threads=1)
    config.model = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=4,
                        num_classes=10, learn_sigma=False)
    config.train.update(num_steps=3, log_every=1, checkpoint_every=1, preview_every=0, **train)
    return config


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    config = _tiny_config()
    config.optimizer.update(name="sgd", learning_rate=1e30)
    with pytest.raises(loop.NonFiniteLossError, match=r"at step \d") as error:
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
