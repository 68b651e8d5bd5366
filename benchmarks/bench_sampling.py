"""Sampling throughput and loop overhead: a whole jitted N-step sampler against N bare denoiser calls.

    python benchmarks/bench_sampling.py [--preset=DiT-S/4] [--input_size=16] [--batch_size=8]
        [--num_steps=250] [--samplers=ddpm,ddim,dpm_solver++] [--cfg_scale=4.0] [--repeats=3] [--nobare]

Throughput (latents/s = batch / median loop time; no VAE decode), e.g. DiT-S/2, 50 DDIM steps,
32x32x4 latents, batch 8:
    python benchmarks/bench_sampling.py --preset=DiT-S/2 --input_size=32 --batch_size=8 \
        --num_steps=50 --samplers=ddim --cfg_scale=0 --nobare

For each sampler it prints the loop's median time, the median time of N chained calls of the
jitted denoiser alone (`x <- denoise(x, t_i)`, each dispatched from Python, as a hand-written loop
would) and the median of their per-repeat ratios (target <= 1.05), in wall time and in CPU time
(all threads; steadier when other processes share the cores: the two are timed alternately, ABBA,
because a shared machine's load drifts), and how many sampling loops were compiled (target: one
per (shape, steps, options), however many times it runs). With --cfg_scale > 1 the "ddpm" run is
repeated under classifier-free guidance against N bare calls of the guided denoiser (2x batch).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  pylint: disable=wrong-import-position

from ldm_jax.diffusion import sampler_plans, samplers, schedules  # noqa: E402
from ldm_jax.diffusion.guidance import Guidance, classifier_free_guidance  # noqa: E402
from ldm_jax.models import dit  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "DiT-S/4", "DiT preset (ldm_jax.models.dit.dit_preset)")
flags.DEFINE_integer("input_size", 16, "latent side")
flags.DEFINE_integer("batch_size", 8, "samples per loop")
flags.DEFINE_integer("num_steps", 250, "sampling steps")
flags.DEFINE_list("samplers", ["ddpm", "ddim", "dpm_solver++"], "samplers to time")
flags.DEFINE_float("cfg_scale", 4.0, "guidance scale of the extra guided ddpm run (<= 1: skip it)")
flags.DEFINE_integer("repeats", 3, "timed runs per measurement (median reported)")
flags.DEFINE_bool("bare", True, "also time N bare denoiser calls (the loop-overhead ratio); --nobare: loop only")

NUM_CLASSES = 10


def _sampler_config(name: str) -> samplers.SamplerConfig:
    """DiT's settings: learned-range DDPM on linspace ("250"-style) spacing; the others plain."""
    if name == "ddpm":
        return samplers.SamplerConfig("ddpm", FLAGS.num_steps, spacing="linspace", variance="learned_range")
    return samplers.SamplerConfig(name, FLAGS.num_steps, spacing="linspace")


@jax.jit
def _denoise_once(denoise_fn, x, t, labels):
    """One bare denoiser call (its parameters passed in, as in the loop); keeps the prediction half."""
    return denoise_fn(x, t, labels)[..., : x.shape[-1]]


def _bare_calls(denoise_fn, noise, labels, model_t) -> jax.Array:
    """N chained denoiser calls, each a separate jitted dispatch: the loop's floor."""
    x = noise
    for t in model_t:
        x = _denoise_once(denoise_fn, x, t, labels)
    return x


def _timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all this process's threads) of `fn(*args)`, outputs blocked on."""
    wall, cpu = time.perf_counter(), time.process_time()
    harness.block(fn(*args))
    return time.perf_counter() - wall, time.process_time() - cpu


def _measure(name: str, denoise_fn, bare_fn, noise, labels, schedule, guidance=None) -> None:
    """Times loop and bare calls alternately, in ABBA order (a shared machine's load drifts)."""
    config = _sampler_config(name)
    key = jax.random.key(1)
    model_t = [jnp.full((noise.shape[0],), t, jnp.float32) for t in sampler_plans.make_plan(schedule, config)["model_t"]]
    run = lambda: samplers.sample(denoise_fn, noise, labels, schedule=schedule, config=config,  # noqa: E731
                                  key=key, guidance=guidance)
    bare = lambda: _bare_calls(bare_fn, noise, labels, model_t)  # noqa: E731
    count_before = samplers.compiled_loop_count()
    first_call, _ = _timed(run)
    label = name + (f" + CFG {guidance.scale:g}" if guidance is not None else "")
    if not FLAGS.bare:
        loop = [_timed(run) for _ in range(FLAGS.repeats)]
        wall = statistics.median(t[0] for t in loop)
        print(f"{label:>18}: loop {wall:6.2f} s = {noise.shape[0] / wall:6.2f} latents/s "
              f"({FLAGS.num_steps / wall:5.1f} steps/s) | first call {first_call:5.1f} s")
        return
    harness.block(_bare_calls(bare_fn, noise, labels, model_t[:1]))  # compile the bare call
    loop, bare_t = [], []
    for r in range(FLAGS.repeats):
        for which in ((loop, run), (bare_t, bare))[:: 1 if r % 2 == 0 else -1]:
            which[0].append(_timed(which[1]))
    compiles = samplers.compiled_loop_count() - count_before
    med = lambda pairs, i: statistics.median(p[i] for p in pairs)  # noqa: E731
    ratio = lambda i: statistics.median(l[i] / b[i] for l, b in zip(loop, bare_t))  # noqa: E731
    print(f"{label:>18}: wall: loop {med(loop, 0):6.2f} s ({noise.shape[0] / med(loop, 0):.2f} latents/s), "
          f"{FLAGS.num_steps} bare calls {med(bare_t, 0):6.2f} s, "
          f"ratio {ratio(0):5.3f} | CPU: loop {med(loop, 1):6.2f} s, bare {med(bare_t, 1):6.2f} s, "
          f"ratio {ratio(1):5.3f} | first call {first_call:5.1f} s | loops compiled over "
          f"{FLAGS.repeats + 1} runs: {compiles}")


def main(argv):
    del argv
    model = dit.dit_preset(FLAGS.preset, input_size=FLAGS.input_size, num_classes=NUM_CLASSES)
    shape = (FLAGS.batch_size, FLAGS.input_size, FLAGS.input_size, model.in_channels)
    key_p, key_x = jax.random.split(jax.random.key(0))
    noise = jax.random.normal(key_x, shape)
    labels = jnp.arange(FLAGS.batch_size) % NUM_CLASSES
    params = nn.unbox(model.init(key_p, noise, jnp.zeros(shape[0]), labels)["params"])
    apply = lambda p, x, t, y: model.apply({"params": p}, x, t, y)  # noqa: E731
    denoise_fn = jax.tree_util.Partial(apply, params)  # params traced, not baked in
    schedule = schedules.discrete_schedule("linear")
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"machine: {harness.machine_name()}")
    print(f"model: {FLAGS.preset} ({n_params / 1e6:.1f}M params, learn_sigma), latents {shape}, "
          f"{FLAGS.num_steps} steps")
    for name in FLAGS.samplers:
        _measure(name, denoise_fn, denoise_fn, noise, labels, schedule)
    if FLAGS.cfg_scale > 1.0:
        guidance = Guidance(FLAGS.cfg_scale, null_cond=NUM_CLASSES, guided_channels=3)
        guided = classifier_free_guidance(denoise_fn, guidance, schedule.time_scale)
        _measure("ddpm", denoise_fn, guided, noise, labels, schedule, guidance=guidance)


if __name__ == "__main__":
    app.run(main)
