"""The U-Net (diffusers' UNet2DConditionModel): parity with diffusers on the tiny random-weight
fixtures of tools/fixtures/unet.py (no torch here), the converter both ways, config errors, the
backbone registry, logical axis names, a sharded forward, and a jitted train step on a mesh.
"""

import functools
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ldm_jax.convert import registry
from ldm_jax.convert.torch_io import load_safetensors
from ldm_jax.convert.unet import (
    module_from_diffusers_config,
    state_dict_from_params,
    unet_from_diffusers,
    unet_to_diffusers,
)
from ldm_jax.diffusion import objectives
from ldm_jax.models import backbones
from ldm_jax.models.unet import UNet2DConditionModel, example_inputs
from ldm_jax.parallel import partitioning
from ldm_jax.parallel.mesh import batch_sharding, make_mesh, replicated
from ldm_jax.training import optimizers, steps
from ldm_jax.training.state import init_sharded_state
from sections import section

FIXTURES = ("sd1", "sd2", "sdxl", "inpaint", "upscaler", "noise_timestep", "class")
COND_KEYS = ("context", "label", "noise_level", "concat", "pooled", "time_ids")
PARAM_AXES = {n for n, _ in partitioning.LOGICAL_AXIS_RULES if not n.startswith("activation_")}
WEIGHTS = "diffusion_pytorch_model.safetensors"
# A tiny class-conditional U-Net, as a `model` config section would give it.
TINY_CLASS = dict(
    kind="unet",
    sample_size=8,
    block_out_channels=(16, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2D",
    layers_per_block=1,
    norm_num_groups=8,
    num_class_embeds=11,
    class_dropout_prob=0.1,
    learn_sigma=True,
)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def load_io(fixtures_dir, name):
    io = np.load(fixtures_dir / f"unet_{name}.npz")
    return io["x"], io["t"], {k: io[k] for k in COND_KEYS if k in io.files} or None, io["out"]


def apply(module, params, x, t, y):
    return jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))(params, x, t, y)


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_diffusers(fixtures_dir, name):
    module, params = unet_from_diffusers(fixtures_dir / f"unet_{name}")
    x, t, y, want = load_io(fixtures_dir, name)
    assert module.sample_shape == (8, 12, x.shape[-1])
    assert set(y or {}) == set(module.condition_fields()) - {"context_mask"}
    got = apply(module, params, x, t, y)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert rel_err(got, want) < 1e-5


def test_fixture_configs_map_to_fields(fixtures_dir):
    fields = {n: unet_from_diffusers(fixtures_dir / f"unet_{n}")[0] for n in ("inpaint", "upscaler", "class", "sdxl")}
    assert (fields["inpaint"].in_channels, fields["inpaint"].concat_channels) == (4, 5)
    assert fields["upscaler"].noise_level_conditioning and fields["upscaler"].num_classes == 0
    assert fields["class"].learn_sigma and fields["class"].num_classes == 11
    assert (fields["sdxl"].pooled_dim, fields["sdxl"].num_time_ids) == (12, 6)


@pytest.mark.parametrize("name", ("sdxl", "class"))
def test_export_round_trip(fixtures_dir, tmp_path, name):
    folder = fixtures_dir / f"unet_{name}"
    module, params = unet_from_diffusers(folder)
    # the exported state dict is the file's, key for key (float16 values read as float32)
    original = load_safetensors(folder / WEIGHTS)
    exported = state_dict_from_params(module, params)
    assert set(exported) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value.astype(np.float32), err_msg=key)
    registry.EXPORTERS["unet_diffusers"].save(module, params, str(tmp_path / "out"), False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((folder / "config.json").read_text())
    for field in ("in_channels", "out_channels", "block_out_channels", "attention_head_dim"):
        assert config[field] == source[field], field
    again, params_again = registry.IMPORTERS["unet_diffusers"].load(str(tmp_path / "out"), {})
    assert again == module
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_again, params)
    with pytest.raises(FileExistsError):
        unet_to_diffusers(module, params, tmp_path / "out")


def test_pipeline_folder_and_missing_weights(fixtures_dir, tmp_path):
    shutil.copytree(fixtures_dir / "unet_class", tmp_path / "pipe" / "unet")
    module, _ = unet_from_diffusers(tmp_path / "pipe")
    assert module.num_class_embeds == 11
    (tmp_path / "pipe" / "unet" / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        unet_from_diffusers(tmp_path / "pipe")


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
        (dict(only_cross_attention=True), "only_cross_attention"),
        (dict(class_embeddings_concat=True), "class_embeddings_concat"),
        (dict(time_embedding_type="fourier"), "time_embedding_type"),
        (dict(addition_embed_type="text_image"), "addition_embed_type"),
        (dict(down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]), "down_block_types"),
        (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
        (dict(layers_per_block=[1, 2]), "layers_per_block"),
        (dict(attention_head_dim=[2, 4, 8]), "attention_head_dim"),
        (dict(some_new_field=1), "some_new_field"),
        (dict(_class_name="UNet2DModel"), "_class_name"),
    ],
)
def test_unsupported_config_is_one_line_naming_the_field(fixtures_dir, change, field):
    config = json.loads((fixtures_dir / "unet_sd1" / "config.json").read_text())
    config.update(change)
    with pytest.raises(ValueError, match=field) as error:
        module_from_diffusers_config(config, "unet/config.json")
    assert "\n" not in str(error.value) and "unet/config.json" in str(error.value)


def test_bad_conditions_are_named():
    module = backbones.backbone_from_config(TINY_CLASS)
    x, t, y = example_inputs(module)
    with pytest.raises(ValueError, match=r"missing: \['label'\]"):
        jax.eval_shape(module.init, jax.random.key(0), x, t, {})
    with pytest.raises(ValueError, match="multiples of 2"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 3, 4, 4)), t, y)
    with pytest.raises(ValueError, match="norm_num_groups=8 does not divide"):
        backbones.backbone_from_config({**TINY_CLASS, "block_out_channels": (12, 16)})


def test_backbone_registry_and_logical_names():
    module = backbones.backbone_from_config(TINY_CLASS)
    assert isinstance(module, UNet2DConditionModel)
    assert module.num_classes == 10 and module.out_channels == 8 and module.sample_shape == (8, 8, 4)
    assert set(module.condition_fields()) == {"label"}
    with pytest.raises(ValueError, match="unknown field"):
        backbones.backbone_from_config({**TINY_CLASS, "depth": 3})
    boxed = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))
    assert len(leaves) > 50
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned)
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= PARAM_AXES, leaf.names


def test_sharded_and_remat_forward_match(fixtures_dir):
    module, params = unet_from_diffusers(fixtures_dir / "unet_sd1")
    x, t, y, want = load_io(fixtures_dir, "sd1")
    tile = lambda a: np.concatenate([a] * 4)  # two samples per batch shard
    x, t, y, want = tile(x), tile(t), jax.tree_util.tree_map(tile, y), tile(want)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))["params"]
    shardings = partitioning.state_shardings(boxed, mesh)
    sharded = jax.device_put(params, shardings)
    kernel = sharded["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["qkv"]["kernel"]
    assert tuple(kernel.sharding.spec) == ("fsdp", None, "tensor", None)
    remat = module.clone(remat=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
        out = apply(remat, sharded, x, t, y)
    assert rel_err(out, want) < 1e-5


def test_train_step_on_a_mesh():
    """One jitted train step of a class-conditional U-Net through the trainer's pieces, its state
    laid out on a (2, 2, 2) mesh by the logical axis rules."""
    model = backbones.backbone_from_config(TINY_CLASS)
    tx = optimizers.make_optimizer(section("optimizer", learning_rate=0.001, grad_clip_norm=1.0))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    init = lambda key: model.init(key, *example_inputs(model))["params"]
    state, shardings = init_sharded_state(init, tx, jax.random.PRNGKey(0), mesh)
    loss_fn = functools.partial(
        steps.diffusion_loss_fn,
        model=model,
        objective=objectives.objective_from_config(section("diffusion"), learn_sigma=True),
    )
    step = jax.jit(
        functools.partial(
            steps.train_step,
            loss_fn=loss_fn,
            tx=tx,
            learning_rate=optimizers.learning_rate_schedule(section("optimizer", learning_rate=0.001)),
            ema_decay=0.99,
        ),
        in_shardings=(shardings, None, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
    )
    rng = np.random.default_rng(0)
    batch = {"latent": rng.standard_normal((8, 8, 8, 4)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32)}
    batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
    before = jax.device_get(state.params)
    state, metrics = step(state, None, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    changed = [not np.array_equal(v, traverse_util.flatten_dict(before)[k]) for k, v in after.items()]
    assert sum(changed) > len(changed) // 2
    conv = shardings.params["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert tuple(conv.spec) == (None, None, None, "fsdp")
