"""DiT conditioning beyond class labels: cross-attention to a (padded) token sequence, adaLN-single,
pooled vector, channel concat, noise level; PixArt-alpha parity against diffusers.

Golden outputs: tools/fixtures/pixart_tiny.py (a tiny random-weight PixArtTransformer2DModel).
"""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from ldm_jax.convert.pixart import dit_config_from_pixart, dit_from_diffusers_pixart
from ldm_jax.convert.torch_io import CheckpointMismatchError, load_safetensors, save_safetensors
from ldm_jax.diffusion.guidance import Guidance, classifier_free_guidance
from ldm_jax.models.dit import DiT, DiTBlock
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel.partitioning import LOGICAL_AXIS_RULES, logical_specs, mesh_shardings

B, L = 8, 5
# Every condition at once: labels, a 5-token context of width 12, pooled [6], concat [5 ch], noise.
FULL = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=1,
    num_heads=4,
    num_classes=10,
    context_dim=12,
    pooled_dim=6,
    concat_channels=5,
    noise_level_conditioning=True,
)
PARAM_AXES = {name for name, _ in LOGICAL_AXIS_RULES if not name.startswith("activation_")}
PIXART = "pixart_tiny_diffusers"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def random_params(module, x, t, y, seed):
    """Params ~ N(0, 0.1^2) in the module's shapes (init's zeroed adaLN would hide everything);
    numpy, because compiling `init` is slow on XLA:CPU."""
    boxed = jax.eval_shape(module.init, jax.random.key(0), x, t, y)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32), nn.unbox(boxed)
    ), boxed


def apply_fn(module):
    return jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))


@pytest.fixture(scope="module")
def inputs():
    """numpy randomness: eager jax.random compiles threefry kernels for seconds on XLA:CPU."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    lengths = np.array([5, 3, 1, 0, 2, 5, 4, 0])  # two samples with no real token
    y = {
        "label": np.arange(B) % 11,  # 10 = the null class
        "context": normal(B, L, 12),
        "context_mask": np.arange(L)[None, :] < lengths[:, None],
        "pooled": normal(B, 6),
        "concat": normal(B, 8, 8, 5),
        "noise_level": np.arange(B) * 40.0,
    }
    return normal(B, 8, 8, 4), np.linspace(0.0, 999.0, B).astype(np.float32), y


@pytest.fixture(scope="module", params=["zero", "single"])
def full(request, inputs):
    """(module, params, boxed shapes, apply, output) for FULL with each adaLN kind."""
    module = DiT(**FULL, adaln=request.param)
    params, boxed = random_params(module, *inputs, seed=1)
    apply = apply_fn(module)
    return module, params, boxed, apply, apply(params, *inputs)


def with_cond(y, **changes):
    return {**y, **changes}


# ----------------------------------------------------------------------------- PixArt parity


@pytest.fixture(scope="module")
def pixart(fixtures_dir):
    module, params = dit_from_diffusers_pixart(fixtures_dir / PIXART)
    golden = dict(np.load(fixtures_dir / "pixart_tiny_io.npz"))
    return module, params, golden, apply_fn(module)


def pixart_cond(golden, **changes):
    return {"context": golden["context"], "context_mask": golden["context_mask"], **changes}


def test_pixart_matches_diffusers(pixart):
    module, params, golden, apply = pixart
    assert (module.adaln, module.context_dim, module.num_classes, module.learn_sigma) == (
        "single",
        24,
        0,
        True,
    )
    assert module.pos_interpolation_scale == 2.0
    assert not golden["context_mask"].all() and golden["context_mask"].sum(1).min() == 1
    err = rel_err(apply(params, golden["x"], golden["t"], pixart_cond(golden)), golden["out"])
    print(f"PixArt fp32 max rel err {err:.2e}")
    assert err <= 1e-5
    # The fixture's interpolation_scale=2 matters: with scale 1 the output is far off.
    unscaled = module.clone(pos_interpolation_scale=1.0)
    out = apply_fn(unscaled)(params, golden["x"], golden["t"], pixart_cond(golden))
    assert rel_err(out, golden["out"]) > 1e-3


def test_pixart_padding_tokens_are_ignored(pixart):
    module, params, golden, apply = pixart
    mask = golden["context_mask"]
    noise = 100.0 * np.random.default_rng(0).standard_normal(golden["context"].shape)
    repadded = np.where(mask[..., None], golden["context"], noise).astype(np.float32)
    x, t = golden["x"], golden["t"]
    ref = apply(params, x, t, pixart_cond(golden))
    np.testing.assert_array_equal(apply(params, x, t, pixart_cond(golden, context=repadded)), ref)
    # ... while a real token does count
    changed = golden["context"].copy()
    changed[:, 0] += 1.0
    assert rel_err(apply(params, x, t, pixart_cond(golden, context=changed)), ref) > 1e-3


def test_pixart_mismatch_lists_every_problem(fixtures_dir, tmp_path):
    folder = tmp_path / "pixart"
    shutil.copytree(fixtures_dir / PIXART, folder)
    state = load_safetensors(folder / WEIGHTS)
    del state["transformer_blocks.1.attn2.to_v.bias"]
    state["transformer_blocks.0.attn1.norm_q.weight"] = np.ones(8, np.float32)
    state["caption_projection.linear_1.weight"] = np.zeros((16, 20), np.float32)
    save_safetensors(state, folder / WEIGHTS)
    with pytest.raises(CheckpointMismatchError) as info:
        dit_from_diffusers_pixart(folder)
    message = str(info.value)
    for expected in (
        "missing keys (1)",
        "transformer_blocks.1.attn2.to_v.bias",
        "unexpected keys (1)",
        "transformer_blocks.0.attn1.norm_q.weight",
        "wrong shapes (1)",
        "caption_projection.linear_1.weight: expected (16, 24), got (16, 20)",
    ):
        assert expected in message


def test_unconditional_model_takes_no_condition():
    module = DiT(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=4, num_classes=0)
    x, t = jnp.zeros((2, 8, 8, 4)), jnp.zeros(2)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x, t)["params"]
    assert "y_embedder" not in shapes
    with pytest.raises(ValueError, match=r"unknown here: \['label'\]; .*no condition \(y=None\)"):
        module.apply(nn.unbox(shapes), x, t, jnp.zeros(2, jnp.int32))


def test_guidance_null_condition(full, inputs):
    """The documented null_cond: null label, empty-caption context/mask/pooled, concat and noise
    level passed through; guidance scale 0 gives the model's output on that null condition."""
    module, params, _, apply, out = full
    x, t, y = inputs
    null = {
        "label": 10,
        "context": np.full((L, 12), 0.3, np.float32),  # an "empty caption" embedding, [L, Dc]
        "context_mask": np.arange(L) < 1,
        "pooled": np.full((6,), -0.2, np.float32),
        "concat": y["concat"],
        "noise_level": y["noise_level"],
    }
    denoise = Partial(apply, params)
    guided = {
        scale: jax.jit(classifier_free_guidance(denoise, Guidance(scale, null)))(x, t, y)
        for scale in (0.0, 1.0)
    }
    broadcast = jax.tree.map(lambda c, n: np.broadcast_to(n, np.shape(c)), y, null)
    np.testing.assert_allclose(guided[1.0], out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        guided[0.0][..., :4], apply(params, x, t, broadcast)[..., :4], rtol=1e-5, atol=1e-5
    )
    assert rel_err(guided[0.0][..., :4], out[..., :4]) > 1e-3


def test_pixart_overrides_must_keep_the_layout(fixtures_dir):
    with pytest.raises(ValueError, match=r"got DiT.concat_channels=1, DiT.qk_norm=True"):
        dit_from_diffusers_pixart(fixtures_dir / PIXART, qk_norm=True, concat_channels=1)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(_class_name="DiTTransformer2DModel"), "_class_name='DiTTransformer2DModel'"),
        (dict(use_additional_conditions=True), "use_additional_conditions"),
        (dict(use_additional_conditions=None, sample_size=128), "use_additional_conditions"),
        (dict(cross_attention_dim=32), "cross_attention_dim=32"),
        (dict(caption_channels=None), "caption_channels"),
        (dict(norm_eps=1e-5), "norm_eps=1e-05"),
        (dict(out_channels=6), "out_channels=6"),
    ],
)
def test_pixart_unsupported_config_names_the_field(fixtures_dir, change, field):
    config = json.loads((fixtures_dir / PIXART / "config.json").read_text())
    with pytest.raises(ValueError, match=field):
        dit_config_from_pixart({**config, **change})


# ----------------------------------------------------------------------------- conditions


def test_every_condition_changes_the_output(full, inputs):
    module, params, _, apply, out = full
    x, t, y = inputs
    assert out.shape == (B, 8, 8, 8) and out.dtype == jnp.float32  # 2 * in_channels, not concat
    changes = {
        "label": (y["label"] + 1) % 10,
        "context": y["context"] + 0.5,
        "pooled": y["pooled"] + 0.5,
        "concat": y["concat"] + 0.5,
        "noise_level": y["noise_level"] + 100.0,
    }
    for key, value in changes.items():
        changed = apply(params, x, t, with_cond(y, **{key: value}))
        per_sample = np.max(np.abs(np.asarray(changed - out)), axis=(1, 2, 3))
        if key == "context":  # samples 3 and 7 have no real token: the context cannot matter
            assert np.all(per_sample[[3, 7]] == 0) and np.all(per_sample[[0, 1, 2, 4, 5, 6]] > 0)
        else:
            assert np.all(per_sample > 0), key


def test_mask_is_honoured_and_empty_rows_are_finite(full, inputs):
    _, params, _, apply, out = full
    x, t, y = inputs
    mask = np.asarray(y["context_mask"])
    assert np.all(np.isfinite(np.asarray(out)))
    repadded = jnp.where(mask[..., None], y["context"], 1e3 * jnp.ones_like(y["context"]))
    np.testing.assert_array_equal(apply(params, x, t, with_cond(y, context=repadded)), out)
    # without a mask every token counts
    unmasked = {k: v for k, v in y.items() if k != "context_mask"}
    assert rel_err(apply(params, x, t, unmasked), out) > 1e-3


def test_low_resolution_concat_is_upsampled(full, inputs):
    _, params, _, apply, _ = full
    x, t, y = inputs
    low = y["concat"][:, ::2, ::2]  # [B, 4, 4, 5]
    upsampled = jax.image.resize(low, (B, 8, 8, 5), "bilinear")
    np.testing.assert_allclose(
        apply(params, x, t, with_cond(y, concat=low)),
        apply(params, x, t, with_cond(y, concat=upsampled)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_param_layout(full):
    module, params, _, _, _ = full
    assert params["x_embedder"]["kernel"].shape == (2, 2, 4 + 5, 32)  # concat: only here
    assert params["final_layer"]["linear"]["kernel"].shape == (32, 2, 2, 8)
    assert params["caption_projection"]["fc1"]["kernel"].shape == (12, 32)
    assert params["pooled_embedder"]["fc1"]["kernel"].shape == (6, 32)
    assert params["blocks_0"]["cross_attn"]["kv"]["kernel"].shape == (32, 2, 4, 8)
    assert "noise_level_embedder" in params
    single = module.adaln == "single"
    assert ("adaln_single" in params) == single
    for layer in ("blocks_0", "final_layer"):
        assert ("scale_shift_table" in params[layer]["adaLN_modulation"]) == single
        assert ("linear" in params[layer]["adaLN_modulation"]) != single


def test_every_param_has_logical_names(full):
    _, _, boxed, _, _ = full
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned)
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= PARAM_AXES, leaf.names


def test_sharded_forward_matches_unsharded(full, inputs):
    # Two samples per batch shard (data x fsdp = 4 shards of 8): one sample per shard trips an
    # XLA:CPU miscompile (see test_dit.py).
    module, params, boxed, _, out = full
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = jax.device_put(params, mesh_shardings(logical_specs(boxed), mesh))
    assert tuple(sharded["blocks_0"]["cross_attn"]["kv"]["kernel"].sharding.spec) == (
        "fsdp",
        None,
        "tensor",
        None,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        out_sharded = apply_fn(module)(sharded, *inputs)
    assert rel_err(out_sharded, out) < 1e-5


def test_bf16_and_remat(full, inputs):
    module, params, _, _, out = full
    bf16 = apply_fn(module.clone(dtype=jnp.bfloat16))(params, *inputs)
    assert bf16.dtype == jnp.float32 and 1e-4 < rel_err(bf16, out) < 3e-2
    remat = apply_fn(module.clone(remat=True, remat_policy="dots_saveable"))(params, *inputs)
    assert rel_err(remat, out) < 1e-6


@pytest.mark.parametrize("adaln", ["zero", "single"])
def test_init_block_is_identity_with_cross_attention(adaln):
    """Gates (adaLN-Zero) and the cross-attention projection start at zero: identity blocks."""
    block = DiTBlock(num_heads=4, adaln=adaln)
    x, context = jnp.ones((2, 16, 32)), jnp.ones((2, 3, 32))
    c = jnp.ones((2, 32 if adaln == "zero" else 6 * 32))
    # an "rbg" key: threefry's init compiles for many seconds on XLA:CPU
    variables = jax.jit(block.init)(jax.random.key(1, impl="rbg"), x, c, context)
    params = nn.unbox(variables["params"])
    assert not np.any(params["cross_attn"]["proj"]["kernel"])
    assert np.any(params["cross_attn"]["kv"]["kernel"])
    out = block.apply({"params": params}, x, c, context)
    if adaln == "zero":
        np.testing.assert_array_equal(out, x)
    else:  # PixArt's gates come from its random table; the cross-attention still adds nothing
        no_context = block.apply({"params": params}, x, c)
        np.testing.assert_allclose(out, no_context, rtol=1e-6)


# ----------------------------------------------------------------------------- defaults, errors


def test_defaults_are_the_class_dit():
    module = DiT()
    assert module.condition_fields().keys() == {"label"}
    assert (module.context_dim, module.pooled_dim, module.concat_channels, module.adaln) == (
        None,
        None,
        0,
        "zero",
    )


def test_labels_as_array_or_dict_are_the_same(inputs):
    module = DiT(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    x, t, y = inputs
    params, _ = random_params(module, x, t, y["label"], seed=3)
    apply = apply_fn(module)
    np.testing.assert_array_equal(
        apply(params, x, t, y["label"]), apply(params, x, t, {"label": y["label"]})
    )


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(context=jnp.zeros((B, L, 16))), r"DiT.context_dim=12 needs \[B=8, L, 12\]"),
        (dict(context=jnp.zeros((B, 12))), r"y\['context'\] has shape \(8, 12\).*\[B=8, L, 12\]"),
        (dict(context_mask=jnp.ones((B, L + 1), bool)), r"context_mask.*\[B=8, L=5\]"),
        (dict(pooled=jnp.zeros((B, 7))), r"DiT.pooled_dim=6 needs \[B=8, 6\]"),
        (
            dict(concat=jnp.zeros((B, 8, 8, 4))),
            r"has shape \(8, 8, 8, 4\), but DiT.concat_channels=5 needs \[B=8, h, w, 5\]",
        ),
        (dict(concat=jnp.zeros((B, 3, 3, 5))), r"3x3: h and w must divide DiT.input_size=8"),
        (dict(noise_level=jnp.zeros((B, 1))), r"noise_level_conditioning=True needs \[B=8\]"),
        (dict(label=jnp.zeros((B - 1,), jnp.int32)), r"label.*DiT.num_classes=10 needs \[B=8\]"),
        (dict(context=None), r"missing: \['context'\].*DiT.context_dim=12"),
        (dict(caption=jnp.zeros(B)), r"unknown here: \['caption'\]"),
    ],
)
def test_bad_condition_names_the_field(inputs, change, field):
    x, t, y = inputs
    module = DiT(**FULL)
    y = {k: v for k, v in {**y, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=field):
        jax.eval_shape(lambda y: module.init(jax.random.key(0), x, t, y), y)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(adaln="single_zero"), "adaln='single_zero'"),
        (dict(context_dim=0), "context_dim=0"),
        (dict(pooled_dim=-1), "pooled_dim=-1"),
        (dict(concat_channels=-1), "concat_channels=-1"),
        (dict(num_classes=-1), "num_classes=-1"),
        (dict(pos_interpolation_scale=0.0), "pos_interpolation_scale=0.0"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        DiT(**{**FULL, **overrides})
