"""CLIP text encoder + tokenizer vs transformers (fixtures from tools/fixtures/clip_text.py)."""

import json
import logging
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert.clip import clip_text_from_hf, module_from_hf_config
from ldm_jax.convert.torch_io import CheckpointMismatchError, load_safetensors, save_safetensors
from ldm_jax.data.tokenizer import MAX_TRUNCATION_WARNINGS, CLIPTokenizer
from ldm_jax.models import serialization
from ldm_jax.models.clip import CLIPTextEncoder
from ldm_jax.parallel.partitioning import LOGICAL_AXIS_RULES

ENCODERS = {"quick": "text_encoder", "gelu": "text_encoder_gelu"}
TOKENIZERS = {"quick": "tokenizer", "gelu": "tokenizer_pad0"}  # SD 1.x-like, SD 2.x-like
MODEL_TEXTS = [0, 1, 8]  # tools/fixtures/clip_text.py MODEL_TEXTS
LONG_TEXT = 8


@pytest.fixture(scope="module")
def clip_dir(fixtures_dir):
    return fixtures_dir / "clip_tiny"


@pytest.fixture(scope="module")
def expected(clip_dir):
    with np.load(clip_dir / "expected.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def encoders(clip_dir):
    return {kind: clip_text_from_hf(clip_dir / name) for kind, name in ENCODERS.items()}


def jit_apply(module, params, *args, **kwargs):
    """`module.apply` under jit (much faster than op-by-op for these tests)."""
    apply = jax.jit(module.apply, static_argnames=("skip_last_layers",))
    return apply({"params": params}, *args, **kwargs)


def rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("folder, suffix", [("tokenizer", ""), ("tokenizer_pad0", "_pad0")])
def test_tokenizer_ids_match_transformers(clip_dir, expected, folder, suffix):
    tokenizer = CLIPTokenizer.from_folder(clip_dir / folder)
    ids, mask = tokenizer.encode(list(expected["texts"]), max_length=77)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    for text, row, want in zip(expected["texts"], ids, expected[f"ids{suffix}"]):
        np.testing.assert_array_equal(row, want, err_msg=repr(text))
    np.testing.assert_array_equal(mask, expected[f"mask{suffix}"])
    counts = [len(tokenizer.tokenize(t)) + 2 for t in expected["texts"]]
    np.testing.assert_array_equal(counts, expected["num_tokens"])


def test_pad_token_comes_from_the_tokenizer_files(clip_dir, expected):
    sd1 = CLIPTokenizer.from_folder(clip_dir / "tokenizer")
    sd2 = CLIPTokenizer.from_folder(clip_dir / "tokenizer_pad0")
    assert sd1.pad_token_id == sd1.eos_token_id == len(sd1.vocab) - 1
    assert sd2.pad_token == "!" and sd2.pad_token_id == 0
    # SD 2.x's pad token is special: "!" in a prompt is id 0, not the word "!</w>".
    assert sd2.tokenize("a cat!") == sd1.tokenize("a cat") + [0]
    assert sd1.tokenize("a cat!") == sd1.tokenize("a cat") + [sd1.vocab["!</w>"]]


def test_encoder_inputs_match_transformers_at_the_model_length(clip_dir, expected):
    texts = [str(expected["texts"][i]) for i in MODEL_TEXTS]
    for kind, folder in TOKENIZERS.items():
        ids, mask = CLIPTokenizer.from_folder(clip_dir / folder).encode(texts, max_length=16)
        np.testing.assert_array_equal(ids, expected[f"ids_{kind}"])
        np.testing.assert_array_equal(mask, expected[f"mask_{kind}"])


def test_long_prompt_is_truncated_with_a_warning(clip_dir, expected, caplog):
    tokenizer = CLIPTokenizer.from_folder(clip_dir / "tokenizer")
    texts = [str(t) for t in expected["texts"]]
    with caplog.at_level(logging.WARNING, logger="ldm_jax.data.tokenizer"):
        ids, mask = tokenizer.encode(texts, max_length=77)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert f"has {expected['num_tokens'][LONG_TEXT]} tokens" in message
    assert texts[LONG_TEXT][:40] in message and "max_length=77" in message
    assert ids[LONG_TEXT, -1] == tokenizer.eos_token_id and mask[LONG_TEXT].all()
    assert ids[LONG_TEXT, 0] == tokenizer.bos_token_id
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_jax.data.tokenizer"):
        np.testing.assert_array_equal(tokenizer.encode(texts, max_length=77)[0], ids)  # the next epoch
        tokenizer.encode([f"{i} {texts[LONG_TEXT]}" for i in range(MAX_TRUNCATION_WARNINGS + 5)], max_length=77)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == MAX_TRUNCATION_WARNINGS  # 19 new texts (the first was reported already) + 1
    assert messages[-1] == f"{MAX_TRUNCATION_WARNINGS} texts truncated: further ones are not reported"


def test_tokenizer_errors(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    tokenizer = CLIPTokenizer.from_folder(clip_dir / "tokenizer")
    with pytest.raises(ValueError, match="max_length=1"):
        tokenizer.encode("a cat", max_length=1)
    with pytest.raises(ValueError, match="pad_token"):
        CLIPTokenizer(tokenizer.vocab, [], pad_token="<pad>")
    with pytest.raises(ValueError, match="merge 0"):
        CLIPTokenizer(tokenizer.vocab, [("c", "zz")])


# ----------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ["quick", "gelu"])
def test_encoder_matches_transformers(encoders, expected, kind, masked):
    module, params = encoders[kind]
    ids, mask = expected[f"ids_{kind}"], expected[f"mask_{kind}"]
    out = jit_apply(module, params, ids, mask if masked else None)
    tag = f"_{kind}_masked" if masked else f"_{kind}"
    errors = {
        "last_hidden_state": rel_err(out.last_hidden_state, expected[f"last_hidden_state{tag}"]),
        "pooler_output": rel_err(out.pooler_output, expected[f"pooler_output{tag}"]),
        "penultimate": rel_err(out.hidden_states[-2], expected[f"penultimate{tag}"]),
    }
    assert max(errors.values()) <= 1e-5, errors
    assert len(out.hidden_states) == module.num_hidden_layers + 1
    # The mask changes the padded positions (and only them: attention is causal).
    padded = mask == 0
    masked_ref, plain_ref = (expected[f"last_hidden_state_{kind}{s}"] for s in ("_masked", ""))
    assert np.abs(masked_ref - plain_ref)[padded].max() > 1e-3
    np.testing.assert_allclose(masked_ref[~padded], plain_ref[~padded], atol=1e-5)


@pytest.mark.parametrize("kind", ["quick", "gelu"])
def test_skip_last_layers_is_diffusers_clip_skip(encoders, expected, kind):
    module, params = encoders[kind]
    out = jit_apply(module, params, expected[f"ids_{kind}"], skip_last_layers=1)
    assert rel_err(out.last_hidden_state, expected[f"clip_skip1_{kind}"]) <= 1e-5
    assert len(out.hidden_states) == module.num_hidden_layers


def test_pooling_position_follows_eos_token_id(encoders, expected):
    quick, gelu = encoders["quick"][0], encoders["gelu"][0]
    assert quick.eos_token_id == 2 and gelu.eos_token_id == gelu.vocab_size - 1
    ids = jnp.array([[504, 3, 505, 505, 505], [504, 505, 0, 0, 0]])
    np.testing.assert_array_equal(quick.pooled_positions(ids), [2, 1])  # argmax
    ids = jnp.array([[504, 7, 505, 600, 0]])  # an id above eos (an added token)
    assert int(quick.clone(vocab_size=700).pooled_positions(ids)[0]) == 3
    assert int(gelu.pooled_positions(ids)[0]) == 2  # first eos


def test_shorter_input_is_a_prefix_of_the_full_one(encoders, expected):
    module, params = encoders["quick"]
    out = jit_apply(module, params, expected["ids_quick"][:, :5])
    assert rel_err(out.last_hidden_state, expected["last_hidden_state_quick"][:, :5]) <= 1e-5


def test_encoder_input_errors(encoders):
    module, params = encoders["gelu"]
    ids = jnp.zeros((1, 17), jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        module.apply({"params": params}, ids)
    with pytest.raises(ValueError, match="skip_last_layers=3"):
        module.apply({"params": params}, ids[:, :4], skip_last_layers=3)
    with pytest.raises(ValueError, match="attention_mask"):
        module.apply({"params": params}, ids[:, :4], jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        CLIPTextEncoder(hidden_act="relu")
    with pytest.raises(ValueError, match="num_attention_heads=5"):
        CLIPTextEncoder(hidden_size=32, num_attention_heads=5)


def test_every_parameter_has_known_logical_axes(encoders):
    module, _ = encoders["quick"]
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names


def test_bfloat16_compute_stays_close(encoders, expected):
    module, params = encoders["quick"]
    out = jit_apply(module.clone(dtype=jnp.bfloat16), params, expected["ids_quick"])
    assert out.last_hidden_state.dtype == jnp.float32
    assert rel_err(out.last_hidden_state, expected["last_hidden_state_quick"]) < 5e-2


# ----------------------------------------------------------------------------- converter


def test_unprefixed_keys_and_position_ids_buffer_load(clip_dir, encoders, tmp_path):
    _, params = encoders["quick"]
    shutil.copy(clip_dir / "text_encoder" / "config.json", tmp_path / "config.json")
    state = load_safetensors(clip_dir / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in state)
    state = {k[len("text_model.") :]: v for k, v in state.items()}
    state["embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_safetensors(state, tmp_path / "model.safetensors")
    _, loaded = clip_text_from_hf(tmp_path)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_mismatched_weights_list_every_problem(clip_dir, tmp_path):
    shutil.copy(clip_dir / "text_encoder" / "config.json", tmp_path / "config.json")
    state = load_safetensors(clip_dir / "text_encoder" / "model.safetensors")
    del state["text_model.final_layer_norm.bias"]
    state["text_model.text_projection.weight"] = np.zeros((32, 32), np.float32)
    state["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((32, 32), np.float32)
    save_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as error:
        clip_text_from_hf(tmp_path)
    message = str(error.value)
    assert "missing keys (1)" in message and "final_layer_norm.bias" in message
    assert "unexpected keys (1)" in message and "text_projection.weight" in message
    assert "encoder.layers.1.mlp.fc1.weight: expected (64, 32), got (32, 32)" in message


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(hidden_act="relu"), "hidden_act"),
        (dict(model_type="clip"), "model_type"),
        (dict(architectures=["CLIPTextModelWithProjection"]), "architectures"),
        (dict(num_attention_heads=5), "num_attention_heads"),
    ],
)
def test_unsupported_config_raises_naming_field(clip_dir, change, field):
    config = {**json.loads((clip_dir / "text_encoder" / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=field):
        module_from_hf_config(config)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        clip_text_from_hf(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        clip_text_from_hf(tmp_path)


def test_bundle_round_trip(encoders, expected, tmp_path):
    module, params = encoders["gelu"]
    serialization.save_model(tmp_path / "clip", module, params)
    loaded, loaded_params, _ = serialization.load_model(tmp_path / "clip")
    assert loaded == module
    ids = expected["ids_gelu"]
    want = jit_apply(module, params, ids).last_hidden_state
    np.testing.assert_array_equal(jit_apply(loaded, loaded_params, ids).last_hidden_state, want)
