"""FID Inception feature extraction throughput: full width, 256^2 uint8 images resized to 299.

    python benchmarks/bench_inception.py [--batch_size=16] [--image_size=256] [--repeats=5] [--num_batches=8]

Times `InceptionFeatures` (uint8 -> /255 -> bilinear resize to 299 -> [-1, 1] -> InceptionV3 ->
pool / spatial / unbiased logits, copied back to the host) with random weights of the real
network's shapes (no weights file needed: throughput does not depend on the values):
  1. one batch on one device: images/s and the achieved GFLOP/s against the matmul ceiling;
  2. `extract` over --num_batches batches on a mesh of all devices, as `ldm-jax evaluate` runs it
     (next batch dispatched while the previous one computes): images/s end to end.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from ldm_jax.convert.inception import param_shapes  # noqa: E402
from ldm_jax.evaluation.features import InceptionFeatures  # noqa: E402
from ldm_jax.models.inception import InceptionV3  # noqa: E402
from ldm_jax.parallel import mesh as mesh_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 16, "images per batch")
flags.DEFINE_integer("image_size", 256, "side of the uint8 input images (resized to 299 inside)")
flags.DEFINE_integer("repeats", 5, "timed batches (median)")
flags.DEFINE_integer("num_batches", 8, "batches streamed through `extract` on all devices (0: skip)")


def random_params(module: InceptionV3, seed: int = 0):
    """He-scaled normal params of the module's shapes, made in numpy (jitting `init` compiles slowly)."""
    rng = np.random.default_rng(seed)

    def make(shape):
        fan_in = np.prod(shape.shape[:-1]) if len(shape.shape) > 1 else 1
        return (rng.standard_normal(shape.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree.map(make, param_shapes(module))


def main(argv):
    del argv
    print(harness.machine_name())
    module = InceptionV3()
    extractor = InceptionFeatures(module, random_params(module), batch_size=FLAGS.batch_size)
    images = np.random.default_rng(1).integers(0, 256, (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3), np.uint8)
    batch = jnp.asarray(images)
    flops = harness.compiled_flops(extractor._fn, extractor.params, batch)  # pylint: disable=protected-access
    seconds = harness.median_seconds(extractor, images, repeats=FLAGS.repeats)
    peak = harness.matmul_peak_gflops()
    rate = FLAGS.batch_size / seconds
    print(
        f"FID Inception features ({FLAGS.image_size}^2 uint8 -> 299, batch {FLAGS.batch_size}, float32): "
        f"{seconds:.3f} s/batch = {rate:.1f} images/s; {flops / FLAGS.batch_size / 1e9:.2f} GFLOP/image, "
        f"{flops / seconds / 1e9:.0f} GFLOP/s ({100 * flops / seconds / 1e9 / peak:.0f}% of the "
        f"{peak:.0f} GFLOP/s matmul ceiling)"
    )
    if FLAGS.num_batches:
        mesh = mesh_lib.make_mesh({"data": -1})
        sharded = InceptionFeatures(module, extractor.params, batch_size=FLAGS.batch_size, mesh=mesh)
        stream = [images] * FLAGS.num_batches
        seconds = harness.median_seconds(sharded.extract, stream, repeats=max(1, FLAGS.repeats // 2))
        print(f"extract(), {FLAGS.num_batches} batches of {FLAGS.batch_size} on {mesh.size} device(s): "
              f"{seconds:.2f} s = {FLAGS.num_batches * FLAGS.batch_size / seconds:.1f} images/s")


if __name__ == "__main__":
    app.run(main)
