"""Sample quality against the guidance scale: classifier accuracy AND a distribution metric.

Guidance buys accuracy with diversity, so each scale is reported with the digits classifier's
accuracy and the Frechet distance of the samples to held-out digits (8x8 grey levels, `demo.py`),
beside the distance of as many real training digits. Samples a trained digits DiT:

    python benchmarks/guidance_sweep.py --config=configs/demo_digits.py --workdir=workdir/demo
    python benchmarks/guidance_sweep.py --config=configs/ldm_digits.py --workdir=workdir/ldm \
        --scales=1,1.5,2,3 --num_samples=500
"""
import argparse
import copy
import importlib.util
import os
import time

import numpy as np

from ldm_jax import demo
from ldm_jax.inference import sampling


def _config(path, workdir):
    """(the DiT's sampling config, its workdir): the demo's dit_stage, or a single-stage config."""
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if "dit_stage" in config:  # the demo: stage 1's VAE, stage 2's DiT
        dit = copy.deepcopy(config.dit_stage)
        dit.vae.path = os.path.join(workdir, "vae", "model")
        return dit, os.path.join(workdir, "dit")
    return config, workdir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--scales", default="1,1.5,2,3")
    parser.add_argument("--num_samples", type=int, default=1000)
    args = parser.parse_args()
    config, workdir = _config(args.config, args.workdir)
    print(f"{'guidance':>8} {'accuracy':>9} {'FD':>7} {'FD real':>8} {'FD/real':>8} {'seconds':>8}")
    for scale in (float(s) for s in args.scales.split(",")):
        config.sample.update(guidance_scale=scale, num_samples=args.num_samples, labels="balanced",
                             out_dir=os.path.join(workdir, f"guidance_{scale:g}"))
        began = time.monotonic()
        outputs = sampling.sample_from_config(config, workdir)
        seconds = time.monotonic() - began
        with np.load(outputs["samples"]) as samples:
            score = demo.score_samples(samples["arr_0"], samples["arr_1"], config.data)
        ratio = score["frechet_distance"] / score["frechet_distance_real_train"]
        print(f"{scale:8.2f} {score['conditional_accuracy']:9.1%} {score['frechet_distance']:7.3f} "
              f"{score['frechet_distance_real_train']:8.3f} {ratio:8.2f} {seconds:8.0f}", flush=True)


if __name__ == "__main__":
    main()
