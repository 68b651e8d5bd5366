"""`ldm-jax COMMAND --config=configs/X.py [--config.a.b=v ...] --workdir=DIR [flags]`.

Commands:
  train     train the model of the config (resumes from the workdir's latest checkpoint)
  convert   PyTorch weights -> a model bundle (--from, --src, --out)
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

COMMANDS = ("train", "convert")
CONVERT_FORMATS = ("vae_diffusers", "dit_diffusers", "dit_official")

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and outputs go.")
flags.DEFINE_enum("from", None, CONVERT_FORMATS, "convert: the format of --src.")
flags.DEFINE_string("src", None, "convert: a diffusers model folder or a .pt/.safetensors file.")
flags.DEFINE_string("out", None, "convert: the model bundle directory to write.")
flags.DEFINE_string("model", "DiT-XL/2", "convert (dit_official): the preset of the checkpoint.")
flags.DEFINE_integer("image_size", 256, "convert (dit_official): the image resolution it was trained at.")
FLAGS = flags.FLAGS


def _require(*names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(FLAGS, n) in (None, "")]
    if missing:
        raise app.UsageError(f"{FLAGS[names[0]].name}: missing {', '.join(missing)}")


def train_command() -> None:
    from ldm_jax.training import loop

    _require("config", "workdir")
    loop.train(FLAGS.config, FLAGS.workdir)
    previews = os.path.join(FLAGS.workdir, "previews")
    print(f"checkpoints and logs: {FLAGS.workdir}; exported model: {os.path.join(FLAGS.workdir, 'model')}")
    if os.path.isdir(previews):
        print(f"sample grids: {previews}/{sorted(os.listdir(previews))[-1]}")


def convert_command() -> None:
    from ldm_jax.convert import dit, vae
    from ldm_jax.models import serialization

    _require("from", "src", "out")
    source = FLAGS["from"].value
    if source == "vae_diffusers":
        module, params = vae.vae_from_diffusers(FLAGS.src)
    elif source == "dit_diffusers":
        module, params = dit.dit_from_diffusers(FLAGS.src)
    else:
        module, params = dit.dit_from_official(FLAGS.src, model=FLAGS.model, image_size=FLAGS.image_size)
    serialization.save_model(FLAGS.out, module, params, metadata={"source": os.path.abspath(FLAGS.src), "format": source})
    print(f"wrote {type(module).__name__} bundle to {FLAGS.out}")


class _QuietLibraries(logging.Filter):
    """Keeps INFO logs of ldm_jax and clu (progress, metrics); libraries only from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or any(
            part in record.pathname for part in ("/ldm_jax/", "/clu/")
        )


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: ldm-jax {{{','.join(COMMANDS)}}} [--flags]; got {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
    {"train": train_command, "convert": convert_command}[argv[1]]()


def run() -> None:
    """Console-script entry point."""
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
