"""Model throughput: DiT-S/2 and DiT-B/2 (batch 8, 32x32x4 latents) and the SD VAE at 256².

Prints, per case, the median time of the forward, of forward+backward and (DiT) of the whole
training step (diffusion loss, gradients, AdamW, EMA: `training.steps.train_step`), the FLOPs XLA
counts for the compiled program, the achieved GFLOP/s, and that as a fraction of a jitted `jnp.dot`
peak measured on the same machine (MFU). fp32, one device.

    python benchmarks/bench_models.py [--repeats 5] [--only dit|vae]
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import compiled_flops, machine_name, matmul_peak_gflops, median_seconds, peak_rss_gib  # noqa: E402

from ldm_jax.config import default_config  # noqa: E402
from ldm_jax.diffusion import objectives  # noqa: E402
from ldm_jax.models.dit import dit_preset  # noqa: E402
from ldm_jax.models.vae import SD_VAE_CONFIG, AutoencoderKL  # noqa: E402
from ldm_jax.training import optimizers, steps  # noqa: E402
from ldm_jax.training.state import init_train_state  # noqa: E402


def _report(name: str, fn, args, repeats: int, peak: float, batch: int = 0) -> None:
    jitted = jax.jit(fn)
    flops = compiled_flops(jitted, *args)
    seconds = median_seconds(jitted, *args, repeats=repeats)
    gflops = flops / seconds / 1e9
    rate = f"  {batch / seconds:6.1f} images/s" if batch else ""
    print(f"{name:34s} {seconds * 1e3:9.1f} ms  {flops / 1e9:8.2f} GFLOP  {gflops:7.1f} GFLOP/s  "
          f"{100 * gflops / peak:5.1f}% of peak{rate}", flush=True)


def _random_params(module, *args):
    """Random N(0, 0.02) params of the module's shapes (speed does not depend on the values; compiling
    `init` itself is slow on XLA:CPU)."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes)


def bench_dit(preset: str, repeats: int, peak: float) -> None:
    model = dit_preset(preset, input_size=32, num_classes=1000)
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 4))
    t = jnp.linspace(0, 999, 8)
    y = jnp.arange(8, dtype=jnp.int32)
    params = _random_params(model, x, t, y)

    def forward(p, x):
        return model.apply({"params": p}, x, t, y)

    def forward_backward(p, x):
        return jax.grad(lambda p: jnp.mean(forward(p, x) ** 2))(p)

    _report(f"{preset} forward", forward, (params, x), repeats, peak)
    _report(f"{preset} forward+backward", forward_backward, (params, x), repeats, peak)

    optimizer_config = default_config().optimizer  # DiT's recipe: AdamW, lr 1e-4
    tx = optimizers.make_optimizer(optimizer_config)
    state = init_train_state(params, tx, jax.random.PRNGKey(0))
    loss_fn = functools.partial(steps.diffusion_loss_fn, model=model,
                                objective=objectives.objective_from_config(default_config().diffusion, learn_sigma=model.learn_sigma))
    step = functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx,
                             learning_rate=optimizers.learning_rate_schedule(optimizer_config),
                             ema_decay=0.9999)
    batch = {"latent": x, "label": y}
    _report(f"{preset} train step (AdamW+EMA)", lambda s, b: step(s, None, b), (state, batch), repeats, peak, 8)


def bench_vae(repeats: int, peak: float) -> None:
    vae = AutoencoderKL.from_config(SD_VAE_CONFIG)
    images = jax.random.uniform(jax.random.key(0), (1, 256, 256, 3), minval=-1, maxval=1)
    params = _random_params(vae, images)
    latents = jax.random.normal(jax.random.key(2), (1, 32, 32, 4))
    _report("SD-VAE encode 256² (batch 1)", lambda p, x: vae.apply({"params": p}, x, method=vae.encode).mean,
            (params, images), repeats, peak)
    _report("SD-VAE decode 32²x4 (batch 1)", lambda p, z: vae.apply({"params": p}, z, method=vae.decode),
            (params, latents), repeats, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=("dit", "vae"))
    args = parser.parse_args()
    print(machine_name())
    peak = matmul_peak_gflops()
    print(f"jnp.dot 4096² fp32 peak: {peak:.1f} GFLOP/s")
    if args.only in (None, "dit"):
        for preset in ("DiT-S/2", "DiT-B/2"):
            bench_dit(preset, args.repeats, peak)
    if args.only in (None, "vae"):
        bench_vae(args.repeats, peak)
    print(f"peak host memory: {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
