"""The capacity table of docs/capacity.md: DiT-XL/2 memory per chip and expected step time on TPU
slices under data-parallel, FSDP and FSDP+TP layouts, at global batch 256.

    python -m launch.capacity        # prints the tables that docs/capacity.md embeds

Nothing is typed in: parameter shapes come from the model (`jax.eval_shape` of DiT-XL/2's init),
each chip's shard of them from the project's one partitioning table on an abstract mesh of the
slice, FLOPs and activations from the architecture's sizes (formulas below, forward FLOPs checked
against XLA's count of the lowered forward), time from the chip's peak bf16 FLOP/s and an MFU.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from launch.tpu_vm import parse_slice
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import partitioning
from ldm_jax.models.dit import DiT, dit_preset

GLOBAL_BATCH = 256
SLICES = ("v4-32", "v5p-64")
TENSOR = 4  # tensor-parallel width of the FSDP+TP layout (divides DiT-XL's 16 heads, 4608 MLP, 6912 adaLN)
LAYOUTS = (("data parallel", dict(data=-1, fsdp=1, tensor=1)), ("FSDP", dict(data=1, fsdp=-1, tensor=1)),
           ("FSDP+TP", dict(data=1, fsdp=-1, tensor=TENSOR)))


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_tflops: float  # bf16, per chip
    hbm_gib: float


CHIPS = {"v4": Chip(275.0, 32.0), "v5p": Chip(459.0, 95.0), "v3": Chip(123.0, 32.0)}
# Planning MFU (model FLOPs / peak), not a measurement: see docs/capacity.md.
ASSUMED_MFU = 0.40
# The DiT paper (Sec. 4): DiT-XL/2 "trains at roughly 5.7 iterations/second on a TPU v3-256 pod with
# a global batch size of 256" (256 TensorCores = 128 chips).
PAPER_STEPS_PER_S, PAPER_CHIPS = 5.7, 128

STATE_COPIES = 5  # float32 params, gradients, Adam mu and nu, EMA
STATE_BYTES = 4
ACTIVATION_BYTES = 2  # bf16 compute
GIB = 2.0**30


def dit_xl2() -> DiT:
    return dit_preset("DiT-XL/2", input_size=32, dtype="bfloat16")


def boxed_params(model: DiT) -> Any:
    """Abstract (shape-only) boxed params: logical axis names, no memory."""
    x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))["params"]


def params_per_chip(boxed: Any, sizes: Mapping[str, int], num_chips: int) -> int:
    """Parameter elements one chip holds under the project's partitioning rules on `sizes`."""
    mesh = jax.sharding.AbstractMesh(mesh_lib.mesh_shape(sizes, num_chips), partitioning.MESH_AXES)
    shardings = jax.tree.leaves(partitioning.state_shardings(boxed, mesh),
                                is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))
    return sum(math.prod(s.shard_shape(leaf.shape)) for s, leaf in zip(shardings, jax.tree.leaves(nn.unbox(boxed))))


def matmul_params(boxed: Any) -> tuple[int, int]:
    """(kernel elements applied to every token, kernel elements applied once per image): the adaLN
    modulations and the timestep MLP act on the [B, D] conditioning; the label table is a lookup."""
    per_token = per_image = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)):
        names = [getattr(k, "key", "") for k in path]
        if names[-1] != "kernel":
            continue
        if "adaLN_modulation" in names or "t_embedder" in names:
            per_image += leaf.size
        else:
            per_token += leaf.size
    return per_token, per_image


def tokens(model: DiT) -> int:
    return (model.input_size // model.patch_size) ** 2


def forward_flops(model: DiT, per_token: int, per_image: int) -> float:
    """FLOPs of one image's forward: 2 per multiply-add of every kernel (per token or per image),
    plus attention's two [N, N] products (Q K^T and P V: 4 N^2 D per layer)."""
    n = tokens(model)
    return 2.0 * per_token * n + 2.0 * per_image + 4.0 * n * n * model.hidden_size * model.depth


def xla_forward_flops(model: DiT, params: Any) -> float:
    """XLA's FLOP count of the lowered (not compiled) forward for one image."""
    x = jax.ShapeDtypeStruct((1, model.input_size, model.input_size, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    return float(jax.jit(model.apply).lower({"params": params}, x, t, y).cost_analysis()["flops"])


def activation_elements_per_token(model: DiT, tensor: int) -> float:
    """Elements one block keeps per token for its backward. Replicated over `tensor`: block input,
    both LayerNorm outputs and modulations, attention and MLP outputs before their gates, the
    residual between them (8 D). Split over `tensor` (heads / MLP columns): q, k, v (3 D), the
    attention output (D), the MLP hidden before and after GELU (8 D), softmax probabilities (heads x N)."""
    d = model.hidden_size
    return 8 * d + (12 * d + model.num_heads * tokens(model)) / tensor


def activation_bytes(model: DiT, images: int, tensor: int, remat: bool) -> float:
    """Activation memory of one chip holding `images` images. remat (nothing_saveable): every block
    keeps only its input (D per token) and one block's activations are live during its recompute."""
    block = tokens(model) * images * activation_elements_per_token(model, tensor) * ACTIVATION_BYTES
    if not remat:
        return model.depth * block
    return model.depth * tokens(model) * images * model.hidden_size * ACTIVATION_BYTES + block


def collective_bytes(model: DiT, per_chip: int, shape: Mapping[str, int], images: int) -> float:
    """Bytes one chip sends per step with ring collectives: gradients all-reduced over `data`
    (2 (d-1)/d of its fp32 shard), parameters all-gathered over `fsdp` for the forward and again
    for the backward plus gradients reduce-scattered (3 (f-1) shards), and per block two
    all-reduces over `tensor` of the [images x N, D] bf16 activations forward and two backward."""
    d, f, t = shape["data"], shape["fsdp"], shape["tensor"]
    shard = per_chip * STATE_BYTES
    activations = images * tokens(model) * model.hidden_size * ACTIVATION_BYTES
    return 2 * (d - 1) / d * shard + 3 * (f - 1) * shard + model.depth * 4 * 2 * (t - 1) / t * activations


def memory_rows(model: DiT, boxed: Any) -> list[dict[str, Any]]:
    rows = []
    for name in SLICES:
        tpu = parse_slice(name)
        chip = CHIPS[tpu.generation]
        for layout, sizes in LAYOUTS:
            shape = dict(zip(partitioning.MESH_AXES, mesh_lib.mesh_shape(sizes, tpu.chips)))
            images = GLOBAL_BATCH // (shape["data"] * shape["fsdp"])
            per_chip = params_per_chip(boxed, sizes, tpu.chips)
            state = per_chip * STATE_COPIES * STATE_BYTES
            acts = [activation_bytes(model, images, shape["tensor"], remat) for remat in (False, True)]
            rows.append(dict(slice=name, chips=tpu.chips, hbm=chip.hbm_gib, layout=layout, shape=shape, images=images,
                             state=state / GIB, acts=[a / GIB for a in acts], totals=[(state + a) / GIB for a in acts],
                             traffic=collective_bytes(model, per_chip, shape, images) / 1e9))
    return rows


def time_rows(step_flops: float, paper_mfu: float) -> list[dict[str, Any]]:
    rows = []
    for name in SLICES:
        tpu = parse_slice(name)
        peak = tpu.chips * CHIPS[tpu.generation].peak_tflops * 1e12
        for label, mfu in ((f"assumed {ASSUMED_MFU:.0%}", ASSUMED_MFU), (f"DiT paper's {paper_mfu:.1%}", paper_mfu)):
            seconds = step_flops / (peak * mfu)
            rows.append(dict(slice=name, mfu=label, step=seconds, remat_step=seconds * 4 / 3,
                             images_per_s=GLOBAL_BATCH / seconds, days_400k=4e5 * seconds / 86400,
                             days_7m=7e6 * seconds / 86400))
    return rows


def render() -> str:
    model = dit_xl2()
    boxed = boxed_params(model)
    params = nn.unbox(boxed)
    per_token, per_image = matmul_params(boxed)
    total = sum(leaf.size for leaf in jax.tree.leaves(params))
    forward = forward_flops(model, per_token, per_image)
    xla = xla_forward_flops(model, params)
    step_flops = GLOBAL_BATCH * 3 * forward
    paper_mfu = PAPER_STEPS_PER_S * step_flops / (PAPER_CHIPS * CHIPS["v3"].peak_tflops * 1e12)
    lines = [
        f"DiT-XL/2 at 256x256 (latents 32x32x4, N = {tokens(model)} tokens, D = {model.hidden_size}, "
        f"depth {model.depth}, {model.num_heads} heads): {total / 1e6:.1f}M parameters, of which "
        f"{per_token / 1e6:.1f}M act on every token and {per_image / 1e6:.1f}M (adaLN, timestep MLP) once per image.",
        "",
        f"Forward FLOPs per image: {forward / 1e9:.1f} G by the formula, {xla / 1e9:.1f} G by XLA's count "
        f"of the lowered forward. Train step (forward + backward = 3x forward) at global batch {GLOBAL_BATCH}: "
        f"{step_flops / 1e12:.1f} TFLOP; with rematerialisation {GLOBAL_BATCH * 4 * forward / 1e12:.1f} TFLOP "
        "executed.",
        "",
        "| slice | layout (data x fsdp x tensor) | images / chip | params + grads + Adam + EMA, fp32 "
        "| activations, no remat | activations, remat | total, no remat / remat | HBM | collectives / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in memory_rows(model, boxed):
        shape = " x ".join(str(row["shape"][axis]) for axis in partitioning.MESH_AXES)
        lines.append(
            f"| {row['slice']} ({row['chips']} chips) | {row['layout']} ({shape}) | {row['images']} "
            f"| {row['state']:.2f} GiB | {row['acts'][0]:.2f} GiB | {row['acts'][1]:.2f} GiB "
            f"| {row['totals'][0]:.1f} / {row['totals'][1]:.1f} GiB | {row['hbm']:.0f} GiB | {row['traffic']:.1f} GB |")
    lines += [
        "",
        "| slice | MFU | step time | step time, remat | images / s | 400K steps | 7M steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in time_rows(step_flops, paper_mfu):
        lines.append(
            f"| {row['slice']} | {row['mfu']} | {row['step'] * 1e3:.0f} ms | {row['remat_step'] * 1e3:.0f} ms "
            f"| {row['images_per_s']:,.0f} | {row['days_400k']:.1f} days | {row['days_7m']:.1f} days |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
