"""Input pipeline throughput: the 256^2 image pipeline and the cached-latent pipeline.

    python benchmarks/bench_data.py [--num_images=512] [--batch_size=32] [--dit_step_s=1.5]

Writes synthetic ImageNet-like JPEGs (500x375) to a temporary folder, times the image pipeline
(decode + center crop to 256 + flip + [-1, 1]), caches their latents with a cheap stand-in
encoder (8x8 average pool + fixed linear map -> 32x32x4 mean/std, flip variants), times the latent
pipeline (read + pick variant + sample + scale), and prints samples/s and how many times faster the
latent pipeline is than a DiT-B/2 train step at batch 8 on 32x32x4 latents consumes samples (the
step is measured unless --dit_step_s is given).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from ldm_jax.data import latent_cache  # noqa: E402
from ldm_jax.data import pipeline  # noqa: E402
from ldm_jax.data import sources  # noqa: E402
from ldm_jax.parallel import partitioning  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 512, "synthetic JPEGs to write")
flags.DEFINE_integer("batch_size", 32, "global batch of both pipelines")
flags.DEFINE_integer("num_batches", 30, "batches timed per pipeline (after 3 warm-up batches)")
flags.DEFINE_integer("num_threads", 2, "grain read threads")
flags.DEFINE_integer("num_workers", 0, "grain mp_prefetch workers (0 = in-process)")
flags.DEFINE_float("dit_step_s", 0.0, "DiT-B/2 train step time at batch 8 (0 = measure it)")

LATENT_CHANNELS, FACTOR = 4, 8
PROJECTION = np.random.default_rng(0).normal(size=(3, 2 * LATENT_CHANNELS)).astype(np.float32)


def write_jpegs(folder: str, n: int) -> None:
    """n smooth-plus-noise 500x375 JPEGs (quality 90, about ImageNet's bytes per image) in 10 classes."""
    rng = np.random.default_rng(0)
    for i in range(n):
        class_dir = os.path.join(folder, f"class{i % 10}")
        os.makedirs(class_dir, exist_ok=True)
        smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize((500, 375), Image.BICUBIC)
        noisy = np.clip(np.asarray(smooth, np.int16) + rng.integers(-20, 21, (375, 500, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(os.path.join(class_dir, f"{i}.jpg"), quality=90)


def encode_fn(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stand-in encoder: [B, 256, 256, 3] -> mean, std [B, 32, 32, 4]."""
    b, h, w, c = images.shape
    pooled = images.reshape(b, h // FACTOR, FACTOR, w // FACTOR, FACTOR, c).mean(axis=(2, 4))
    features = pooled @ PROJECTION
    return features[..., :LATENT_CHANNELS], jax.nn.softplus(features[..., LATENT_CHANNELS:])


def samples_per_second(config, sharding) -> float:
    iterator = pipeline.make_pipeline(config, sharding)
    try:
        for _ in range(3):
            harness.block(next(iterator))
        start = time.perf_counter()
        for _ in range(FLAGS.num_batches):
            harness.block(next(iterator))
        return FLAGS.num_batches * config.batch_size / (time.perf_counter() - start)
    finally:
        iterator.close()


def dit_b2_step_seconds(batch: int = 8) -> float:
    """Median time of a plain jitted DiT-B/2 train step (eps MSE + AdamW) on [batch, 32, 32, 4]."""
    from ldm_jax.models import dit  # pylint: disable=g-import-not-at-top

    model = dit.dit_preset("DiT-B/2", input_size=32, num_classes=1000)
    x = jnp.ones((batch, 32, 32, 4))
    t, y = jnp.full((batch,), 500.0), jnp.zeros((batch,), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x, t, y)["params"])
    optimizer = optax.adamw(1e-4)

    @jax.jit
    def step(params, opt_state, x, noise):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p}, x, t, y)[..., :4] - noise) ** 2)

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    noise = jax.random.normal(jax.random.key(1), x.shape)
    return harness.median_seconds(step, params, opt_state, x, noise, repeats=3)


def main(argv):
    del argv
    print(harness.machine_name())
    print(f"global batch {FLAGS.batch_size}, {FLAGS.num_threads} read threads, {FLAGS.num_workers} workers")
    mesh = jax.make_mesh(
        (jax.device_count(), 1, 1), partitioning.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    sharding = pipeline.batch_sharding(mesh)
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = os.path.join(tmp, "images"), os.path.join(tmp, "latents")
        write_jpegs(folder, FLAGS.num_images)
        common = dict(
            batch_size=FLAGS.batch_size, num_threads=FLAGS.num_threads, num_workers=FLAGS.num_workers
        )
        image_config = pipeline.default_config()
        image_config.update(dict(source="image_folder", path=folder, image_size=256, **common))
        image_rate = samples_per_second(image_config, sharding)
        print(f"image pipeline  (500x375 JPEG -> 256^2):          {image_rate:8.1f} samples/s")

        start = time.perf_counter()
        latent_cache.cache_latents(
            sources.ImageFolderSource(folder), encode_fn, cache, image_size=256, downsample_factor=FACTOR,
            batch_size=FLAGS.batch_size, sharding=sharding, num_threads=FLAGS.num_threads, log_every_s=1e9,
        )  # fmt: skip
        cache_rate = FLAGS.num_images / (time.perf_counter() - start)
        print(f"latent caching  (stand-in encoder, with flips):      {cache_rate:8.1f} images/s")
        latent_config = pipeline.default_config()
        latent_config.update(dict(source="latents", path=cache, **common))
        latent_rate = samples_per_second(latent_config, sharding)
        print(f"latent pipeline (32x32x4, sample + flip):         {latent_rate:8.1f} samples/s")

    step_s = FLAGS.dit_step_s or dit_b2_step_seconds()
    consumed = 8 / step_s
    print(f"DiT-B/2 train step, batch 8: {step_s:.2f} s ({'given' if FLAGS.dit_step_s else 'measured'}) "
          f"-> consumes {consumed:.1f} samples/s")
    print(f"latent pipeline feeds {latent_rate / consumed:.0f}x faster than the step consumes "
          f"(target >= 20x); image pipeline {image_rate / consumed:.1f}x")


if __name__ == "__main__":
    app.run(main)
