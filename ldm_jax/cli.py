"""`ldm-jax COMMAND --config=configs/X.py [--config.a.b=v ...] --workdir=DIR [flags]`.

Commands:
  train     train the model of the config (resumes from the workdir's latest checkpoint)
  encode    cache VAE latents of the config's image data (config.vae.path) to --out, resumably;
            train on them with data.source="latents", data.path=<out>
  convert   PyTorch weights -> a model bundle (--from, --src, --out)
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

COMMANDS = ("train", "encode", "convert")
CONVERT_FORMATS = ("vae_diffusers", "dit_diffusers", "dit_official")

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and outputs go.")
flags.DEFINE_enum("from", None, CONVERT_FORMATS, "convert: the format of --src.")
flags.DEFINE_string("src", None, "convert: a diffusers model folder or a .pt/.safetensors file.")
flags.DEFINE_string("out", None, "convert: the model bundle directory; encode: the latent cache directory.")
flags.DEFINE_integer("shard_size", 1024, "encode: examples per array_record shard.")
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


def encode_command() -> None:
    import jax

    from ldm_jax.data import latent_cache, pipeline
    from ldm_jax.parallel import mesh as mesh_lib
    from ldm_jax.training import tasks

    _require("config", "out")
    config = FLAGS.config
    if not config.vae.path:
        raise app.UsageError("encode: set --config.vae.path to the VAE model bundle to encode with")
    mesh_lib.initialize_distributed(config.get("distributed"))
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    data = pipeline.resolve_config(config.data)
    vae, params, _ = tasks.load_vae(config.vae.path)
    params = jax.device_put(params, mesh_lib.replicated(mesh))

    def encode(images):
        return vae.apply({"params": params}, images, method=vae.encode)

    meta = latent_cache.cache_latents(
        pipeline.make_source(data), encode, FLAGS.out, image_size=data.image_size,
        downsample_factor=vae.downsample_factor, batch_size=data.batch_size,
        sharding=pipeline.batch_sharding(mesh), flip=data.random_flip, shard_size=FLAGS.shard_size,
        num_threads=data.num_threads,
    )
    print(f"latent cache ({meta.get('num_examples', '?')} examples) in {FLAGS.out}; train on it with "
          f"--config.data.source=latents --config.data.path={FLAGS.out}")


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
    {"train": train_command, "encode": encode_command, "convert": convert_command}[argv[1]]()


def run() -> None:
    """Console-script entry point."""
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
