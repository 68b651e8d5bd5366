"""The DiT model: presets, validation, adaLN-Zero init, logical names, sharding, bf16, remat,
qk_norm.

Parity with PyTorch (official DiT and diffusers) is in test_convert_dit.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.dit import DIT_PRESETS, REMAT_POLICIES, DiT, DiTBlock, dit_preset
from ldm_jax.models.layers import sincos_pos_embed_2d, timestep_embedding
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel.partitioning import LOGICAL_AXIS_RULES, logical_specs, mesh_shardings

TINY = dict(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10
)
PARAM_AXES = {name for name, _ in LOGICAL_AXIS_RULES if not name.startswith("activation_")}


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def randomise(shapes, seed, std=0.1):
    """Params ~ N(0, std^2) in the shapes of `shapes` (arrays or ShapeDtypeStructs).

    adaLN-Zero init would make most comparisons trivial. numpy, because compiling `init`'s
    threefry calls is slow on XLA:CPU; only the init test compiles it.
    """
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: (std * rng.standard_normal(a.shape)).astype(np.float32), shapes
    )


def param_shapes(module, *args):
    """Boxed (nn.Partitioned) parameter shapes, without running init."""
    return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
    t = jnp.array([0.0, 3.5, 500.0, 999.0, 1.0, 10.0, 250.5, 700.0])
    y = jnp.array([0, 5, 9, 10, 1, 2, 3, 10])  # 10 = the null class
    return x, t, y


@pytest.fixture(scope="module")
def tiny():
    return DiT(**TINY)


@pytest.fixture(scope="module")
def boxed(tiny, inputs):
    return param_shapes(tiny, *inputs)


@pytest.fixture(scope="module")
def params(boxed):
    return randomise(nn.unbox(boxed), seed=2)


@pytest.fixture(scope="module")
def apply_fp32(tiny):
    return jax.jit(lambda p, x, t, y: tiny.apply({"params": p}, x, t, y))


@pytest.fixture(scope="module")
def out_fp32(apply_fp32, params, inputs):
    return apply_fp32(params, *inputs)


# ----------------------------------------------------------------------------- configuration


def test_presets_have_the_paper_sizes():
    paper = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    assert len(DIT_PRESETS) == 12
    for size, (hidden, depth, heads) in paper.items():
        for patch in (2, 4, 8):
            m = dit_preset(f"DiT-{size}/{patch}")
            assert (m.hidden_size, m.depth, m.num_heads, m.patch_size) == (
                hidden,
                depth,
                heads,
                patch,
            )
            assert (m.mlp_ratio, m.learn_sigma, m.num_classes, m.input_size) == (
                4.0,
                True,
                1000,
                32,
            )
    assert dit_preset("DiT-B/4", input_size=64, num_classes=10).input_size == 64


def test_xl2_parameter_count():
    m = dit_preset("DiT-XL/2")
    x, t, y = jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(m.init, jax.random.key(0), x, t, y)["params"]
    count = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(nn.unbox(shapes)))
    # The reference reports 675,129,632 parameters, which includes its fixed pos_embed buffer.
    assert count == 675_129_632 - 256 * 1152


def test_unknown_preset_lists_allowed_names():
    with pytest.raises(ValueError, match=r"DiT-XXL/2.*allowed: DiT-S/2, DiT-S/4"):
        dit_preset("DiT-XXL/2")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(input_size=30, patch_size=4), "input_size=30 is not divisible by patch_size=4"),
        (dict(hidden_size=30, num_heads=4), "hidden_size=30 is not divisible by num_heads=4"),
        (dict(hidden_size=42, num_heads=6), "hidden_size=42 must be divisible by 4"),
        (dict(depth=0), "depth=0"),
        (dict(class_dropout_prob=1.0), "class_dropout_prob"),
        (dict(remat_policy="all"), "remat_policy='all'"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        DiT(**{**TINY, **overrides})


def test_remat_policies_exist():
    for name in REMAT_POLICIES:
        assert callable(getattr(jax.checkpoint_policies, name))


@pytest.mark.parametrize(
    "shape, field",
    [
        ((8, 8, 8, 3), "in_channels=4"),
        ((8, 16, 16, 4), "input_size=8"),
        ((8, 8, 8), r"\[B, H, W, C\]"),
    ],
)
def test_bad_input_names_the_field(tiny, params, inputs, shape, field):
    _, t, y = inputs
    with pytest.raises(ValueError, match=field):
        jax.eval_shape(lambda x: tiny.apply({"params": params}, x, t, y), jnp.zeros(shape))


# ----------------------------------------------------------------------------- initialisation


def test_adaln_zero_init_gives_zero_output(tiny, apply_fp32, inputs):
    p = nn.unbox(jax.jit(tiny.init)(jax.random.key(1), *inputs)["params"])
    out = apply_fp32(p, *inputs)
    assert out.shape == (8, 8, 8, 8) and out.dtype == jnp.float32
    assert not np.any(np.asarray(out))
    assert np.std(p["t_embedder"]["fc1"]["kernel"]) == pytest.approx(0.02, rel=0.1)
    assert np.std(p["y_embedder"]["embedding_table"]) == pytest.approx(0.02, rel=0.1)
    assert np.any(p["blocks_0"]["attn"]["qkv"]["kernel"])
    assert not np.any(p["blocks_1"]["adaLN_modulation"]["linear"]["kernel"])


def test_null_class_row_exists_only_with_label_dropout(inputs):
    for prob, rows in ((0.1, 11), (0.0, 10)):  # the reference's use_cfg_embedding
        m = DiT(**TINY, class_dropout_prob=prob)
        assert nn.unbox(param_shapes(m, *inputs))["y_embedder"]["embedding_table"].shape == (
            rows,
            32,
        )


def test_every_param_has_logical_names(boxed):
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))
    assert len(leaves) == 2 + 1 + 4 + 2 * 10 + 4  # x, y, t embedders, 2 blocks, final layer
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned)
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= PARAM_AXES, leaf.names


def test_sharded_forward_matches_unsharded(tiny, boxed, params, inputs, out_fp32):
    # Two samples per batch shard: with ONE sample per shard on this (2, 2, 2) mesh, XLA:CPU
    # (jax 0.10.2) miscompiles the gated residual with fsdp/tensor-sharded weights.
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = mesh_shardings(logical_specs(boxed), mesh)
    sharded = jax.device_put(params, shardings)
    assert tuple(sharded["blocks_0"]["attn"]["qkv"]["kernel"].sharding.spec) == (
        "fsdp",
        None,
        "tensor",
        None,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        out = jax.jit(lambda p, x, t, y: tiny.apply({"params": p}, x, t, y))(sharded, *inputs)
    assert rel_err(out, out_fp32) < 1e-5


# ----------------------------------------------------------------------------- embeddings


def test_pos_embed_layout():
    d, g = 16, 4
    pos = sincos_pos_embed_2d(d, g, g).reshape(g, g, d)  # [row, col, D]
    # first half: the column (w) coordinate only; second half: the row (h) coordinate only
    np.testing.assert_array_equal(
        pos[:, :, : d // 2], np.broadcast_to(pos[:1, :, : d // 2], pos[:, :, : d // 2].shape)
    )
    np.testing.assert_array_equal(
        pos[:, :, d // 2 :], np.broadcast_to(pos[:, :1, d // 2 :], pos[:, :, d // 2 :].shape)
    )
    # [sin, cos] per half; the lowest frequency is 1
    np.testing.assert_allclose(pos[0, 3, 0], np.sin(3.0), rtol=1e-6)
    np.testing.assert_allclose(pos[2, 0, d // 2 + d // 4], np.cos(2.0), rtol=1e-6)


def test_timestep_embedding_frequency_divisor():
    t = jnp.array([0.0, 7.25])
    for shift, last_freq in ((0.0, 10000.0 ** (-127 / 128)), (1.0, 1e-4)):
        emb = np.asarray(timestep_embedding(t, 256, freq_shift=shift))
        np.testing.assert_allclose(emb[0], np.r_[np.ones(128), np.zeros(128)])
        # cosines first, sines second; frequency i = 10000 ** (-i / (128 - shift))
        np.testing.assert_allclose(
            emb[1, [0, 127, 128, 255]],
            [np.cos(7.25), np.cos(7.25 * last_freq), np.sin(7.25), np.sin(7.25 * last_freq)],
            rtol=1e-5,
            atol=1e-6,
        )


def test_mlp_norm_eps_is_used_before_the_mlp():
    """With residual-stream variance near 1e-6, the pre-MLP LayerNorm eps visibly matters.

    gate_msa (modulation chunk 2) is zeroed so the attention branch leaves the stream tiny.
    """
    x = 1e-3 * jax.random.normal(jax.random.key(4), (2, 16, 32))
    c = jax.random.normal(jax.random.key(5), (2, 32))
    block = DiTBlock(num_heads=4)
    p = randomise(nn.unbox(param_shapes(block, x, c)), seed=7)
    p["adaLN_modulation"]["linear"]["kernel"][:, 64:96] = 0.0
    p["adaLN_modulation"]["linear"]["bias"][64:96] = 0.0
    outs = {
        eps: DiTBlock(num_heads=4, mlp_norm_eps=eps).apply({"params": p}, x, c)
        for eps in (1e-6, 1e-5)
    }
    assert rel_err(outs[1e-5], outs[1e-6]) > 0.05


# ----------------------------------------------------------------------------- options


def test_bf16_compute_close_to_fp32(params, inputs, out_fp32):
    m = DiT(**TINY, dtype=jnp.bfloat16)
    out = jax.jit(lambda p, x, t, y: m.apply({"params": p}, x, t, y))(params, *inputs)
    assert out.dtype == jnp.float32
    err = rel_err(out, out_fp32)
    assert 1e-4 < err < 3e-2, err  # it did compute in bf16, and stays close


def test_remat_gives_same_output_and_grad(params, inputs, out_fp32):
    def loss_fn(module):
        return jax.jit(
            jax.value_and_grad(lambda p: jnp.sum(module.apply({"params": p}, *inputs) ** 2))
        )

    loss, grad = loss_fn(DiT(**TINY))(params)
    loss_r, grad_r = loss_fn(DiT(**TINY, remat=True, remat_policy="dots_saveable"))(params)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grad_r), jax.tree_util.tree_leaves(grad)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.max(np.abs(b)))
    assert float(loss) == pytest.approx(float(jnp.sum(out_fp32**2)), rel=1e-6)


def test_qk_norm_makes_attention_invariant_to_qk_scale(inputs):
    """RMSNorm on q and k: scaling the q/k projections leaves the output (almost) unchanged."""
    outputs = {}
    for qk_norm in (False, True):
        m = DiT(**TINY, qk_norm=qk_norm)
        p = randomise(nn.unbox(param_shapes(m, *inputs)), seed=9)
        assert ("q_norm" in p["blocks_0"]["attn"]) == qk_norm
        scaled = jax.tree_util.tree_map(np.copy, p)
        for block in ("blocks_0", "blocks_1"):
            qkv = scaled[block]["attn"]["qkv"]
            qkv["kernel"][:, :2] *= 5.0
            qkv["bias"][:2] *= 5.0
        apply = jax.jit(lambda p: m.apply({"params": p}, *inputs))
        outputs[qk_norm] = rel_err(apply(scaled), apply(p))
    assert outputs[True] < 1e-4 < 1e-2 < outputs[False], outputs
