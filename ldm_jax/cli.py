"""`ldm-jax COMMAND --config=configs/X.py [--config.a.b=v ...] --workdir=DIR [flags]`.

Commands:
  demo      the built-in default end to end: a VAE, then a class-conditional DiT on its latents, on
            the bundled digits; a sample grid PNG and the accuracy of a digits classifier on samples
  train     train the model of the config (resumes from the workdir's latest checkpoint)
  sample    sample the trained (or converted) DiT: a PNG grid and, with config.sample.num_samples,
            an ADM-evaluator .npz written in resumable chunks, with the protocol in a JSON beside it
  evaluate  FID, sFID, Inception Score, precision/recall of samples against a reference (JSON)
  encode    cache VAE latents of the config's image data (config.vae.path) to --out, resumably;
            train on them with data.source="latents", data.path=<out>
  convert   weights -> a model bundle (--from=FORMAT --src --out), or a bundle -> another format
            (--to=FORMAT --src --out); every format: convert/registry.py; --overwrite replaces
            what convert wrote there before
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from ldm_jax.convert.registry import EXPORTERS, IMPORTERS

COMMANDS = ("demo", "train", "sample", "encode", "evaluate", "convert")

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and outputs go.")
flags.DEFINE_enum("from", None, tuple(IMPORTERS), "convert: import --src, in this format, into a model bundle.")
flags.DEFINE_enum("to", None, tuple(EXPORTERS), "convert: export the model bundle --src into this format.")
flags.DEFINE_string("src", None, "convert: the weights to import (folder or file), or the bundle to export.")
flags.DEFINE_string("out", None, "convert: the model bundle (import) or folder (export) to write; encode: the "
                    "latent cache directory.")
flags.DEFINE_bool("overwrite", False, "convert: replace the bundle / export already at --out (never other files).")
flags.DEFINE_integer("shard_size", 1024, "encode: examples per array_record shard.")
flags.DEFINE_string("model", "DiT-XL/2", "convert (dit_official): the preset of the checkpoint.")
flags.DEFINE_integer("image_size", 256, "convert (dit_official): the image resolution it was trained at.")
flags.DEFINE_multi_string("prompt", [], "sample: a prompt for a text-conditioned model (repeat for more; "
                          "sample i uses prompt i mod their number); sets config.sample.prompts.")
flags.DEFINE_string("image", None, "sample: the image to inpaint (with --mask) or to upscale; sets config.sample.image.")
flags.DEFINE_string("mask", None, "sample: the inpainting mask (white = fill, black = keep), the image's size; "
                    "sets config.sample.mask.")
flags.DEFINE_enum("task", None, ("inpaint", "upscale"), "sample: the image task (default: what the checkpoint was "
                  "trained for; inpaint when --mask is given); sets config.sample.task.")
FLAGS = flags.FLAGS


def _require(*names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(FLAGS, n) in (None, "")]
    if missing:
        raise app.UsageError(f"{FLAGS[names[0]].name}: missing {', '.join(missing)}")


def train_command() -> None:
    from ldm_jax import storage
    from ldm_jax.training import loop

    _require("config", "workdir")
    loop.train(FLAGS.config, FLAGS.workdir)
    previews = storage.path(FLAGS.workdir) / "previews"
    print(f"checkpoints and logs: {FLAGS.workdir}; exported model: {storage.join(FLAGS.workdir, 'model')}")
    if previews.is_dir():
        print(f"sample grids: {previews}/{sorted(p.name for p in previews.iterdir())[-1]}")


def demo_command() -> None:
    from ldm_jax import demo

    _require("config", "workdir")
    demo.run(FLAGS.config, FLAGS.workdir)


def sample_command() -> None:
    from ldm_jax.inference import sampling

    _require("config", "workdir")
    if FLAGS.prompt:
        FLAGS.config.sample.prompts = tuple(FLAGS.prompt)
    for name in ("image", "mask", "task"):
        if FLAGS[name].value is not None:
            FLAGS.config.sample[name] = FLAGS[name].value
    for name, path in sampling.sample_from_config(FLAGS.config, FLAGS.workdir).items():
        print(f"{name}: {path}")


def evaluate_command() -> None:
    from ldm_jax.evaluation import fid

    _require("config", "workdir")
    results, path = fid.evaluate_from_config(FLAGS.config, FLAGS.workdir)
    print(" ".join(f"{k}={v:.4g}" for k, v in results.items() if isinstance(v, float)))
    print(f"results and protocol: {path}")


def encode_command() -> None:
    from ldm_jax.data import latent_cache

    _require("config", "out")
    if not FLAGS.config.vae.path:
        raise app.UsageError("encode: set --config.vae.path to the VAE model bundle to encode with")
    meta = latent_cache.cache_from_config(FLAGS.config, FLAGS.out, FLAGS.shard_size)
    print(f"latent cache ({meta.get('num_examples', '?')} examples) in {FLAGS.out}; train on it with "
          f"--config.data.source=latents --config.data.path={FLAGS.out}")


def convert_command() -> None:
    from ldm_jax import progress, storage
    from ldm_jax.models import serialization

    source, target = FLAGS["from"].value, FLAGS.to
    if (source is None) == (target is None):
        raise app.UsageError("convert: give --from (import weights into a bundle) or --to (export a bundle)")
    _require("from" if source else "to", "src", "out")
    if target:
        exporter = EXPORTERS[target]
        module, params, _ = serialization.load_model(FLAGS.src)
        if not isinstance(module, exporter.module):
            raise ValueError(f"--src={FLAGS.src} holds a {type(module).__name__} bundle; --to={target} exports "
                             f"{exporter.module.__name__} bundles")
        exporter.save(module, params, FLAGS.out, FLAGS.overwrite)
        print(f"wrote {exporter.target} to {FLAGS.out}")
        return
    out = serialization.check_target(FLAGS.out, FLAGS.overwrite)  # before the (long) conversion
    with progress.bar(2, f"convert {source}", unit="stages") as bar:
        bar.set_postfix_str(f"reading {FLAGS.src}")
        module, params = IMPORTERS[source].load(FLAGS.src, {"model": FLAGS.model, "image_size": FLAGS.image_size})
        bar.update()
        bar.set_postfix_str(f"writing {FLAGS.out}")
        metadata = {"source": os.fspath(storage.path(FLAGS.src)), "format": source}  # a gs:// URI stays one
        serialization.save_model(out, module, params, metadata=metadata, overwrite=FLAGS.overwrite)
        bar.update()
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
    command = argv[1]
    try:
        globals()[f"{command}_command"]()
    except (ValueError, OSError, FloatingPointError) as error:  # bad input, NaN training: one line (LDM_JAX_TRACEBACK=1: all)
        if os.environ.get("LDM_JAX_TRACEBACK"):
            raise
        sys.exit(f"ldm-jax {command}: error: {type(error).__name__}: {error}".splitlines()[0])


def _split_none_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without them, field paths) of the `--config.a.b=None` arguments: absl's typed config
    flags cannot parse None, so optional fields are unset after parsing (`_set_none`)."""
    kept, unset = [], []
    for arg in argv:
        name, _, value = arg.partition("=")
        if name.startswith("--config.") and value == "None":
            unset.append(name[len("--config."):])
        else:
            kept.append(arg)
    return kept, unset


def _set_none(config, path: str) -> None:
    *parents, field = path.split(".")
    for name in parents + [field]:
        if not hasattr(config, "keys") or name not in config:
            raise ValueError(f"--config.{path}=None: the config has no field {path!r}")
        section, config = config, config[name]
    section[field] = None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a missing config file or a mistyped flag or config field reported
    in one line."""
    for arg in argv[1:]:
        if arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1].split(":")[0]):
            sys.exit(f"ldm-jax: error in the flags: {arg}: no such config file")
    argv, unset = _split_none_overrides(argv)
    sys.argv = argv  # config_flags finds the override flags it defines in sys.argv
    try:
        remaining = FLAGS(argv)
        for path in unset:
            _set_none(FLAGS.config, path)
        return remaining
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as error:
        while error.args and isinstance(error.args[0], Exception):  # config_flags wraps KeyErrors
            error = error.args[0]
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        sys.exit(f"ldm-jax: error in the flags: {' '.join(str(message).split())}")


def run() -> None:
    """Console-script entry point."""
    app.run(main, argv=sys.argv, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
