"""Text-to-image end to end: captions in the data pipeline, text embeddings cached beside latents,
caption dropout, training a text-conditioned DiT on digits to recognisable samples, and
`ldm-jax sample --prompt`. The text encoder is the tiny random-weight CLIP of
tests/fixtures/clip_tiny: its features are random, yet they tell the captions apart."""
import functools
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax import demo
from ldm_jax.conditioning import pairs, text_encoding
from ldm_jax.config import default_config
from ldm_jax.data import latent_cache, pipeline, sources
from ldm_jax.diffusion import objectives
from ldm_jax.inference import sampling
from ldm_jax.models import serialization
from ldm_jax.models.dit import DiT
from ldm_jax.parallel.mesh import make_mesh
from ldm_jax.training import steps, tasks
from bundles import train_and_export
from sections import section
from subprocesses import ROOT, cpu_env, load_config

TRAIN_STEPS = 500  # ~99 % on 200 samples; 300 steps give ~80 %
WIDTH = 32  # the tiny CLIP's hidden size
MAX_LENGTH = 16  # configs/t2i_digits.py's text.max_length
DIGIT_NAMES = load_config("t2i_digits").data.caption_class_names
TINY_DIT = dict(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=4, learn_sigma=False)


@pytest.fixture(scope="module")
def clip_paths(fixtures_dir):
    folder = fixtures_dir / "clip_tiny"
    return {"encoder_path": str(folder / "text_encoder"), "tokenizer_path": str(folder / "tokenizer")}


@pytest.fixture(scope="module")
def text_encoder(clip_paths):
    """(TextEncoder, params) of the tiny CLIP at configs/t2i_digits.py's settings."""
    return text_encoding.text_encoder_from_config(section("text", **clip_paths, max_length=MAX_LENGTH))


def _config(clip_paths):
    """configs/t2i_digits.py (as the CLI loads it) with the tiny CLIP."""
    config = load_config("t2i_digits")
    config.text.update(**clip_paths)
    config.model.update(context_dim=WIDTH, pooled_dim=WIDTH)
    return config


def _random_params(module, *inputs):
    """Random float32 params (std 0.05) in the module's shapes: init's zero-initialised
    cross-attention output and adaLN gates would hide the conditions."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"])
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _text_dit(**fields):
    return DiT(**{**TINY_DIT, "num_classes": 0, "context_dim": WIDTH, "pooled_dim": WIDTH, **fields})


def _text_inputs(batch):
    return {"context": jnp.zeros((batch, 3, WIDTH)), "context_mask": jnp.ones((batch, 3), bool),
            "pooled": jnp.zeros((batch, WIDTH))}


# --- caption dropout and the loss's conditions -----------------------------------------------------


def test_dropped_samples_get_exactly_the_empty_caption_and_null_class_in_one_draw():
    b, length = 64, 5
    rng = np.random.default_rng(0)
    cond = {"label": jnp.asarray(rng.integers(0, 10, b), jnp.int32),
            "context": jnp.asarray(rng.standard_normal((b, length, 4)), jnp.float32),
            "context_mask": jnp.ones((b, length), bool),
            "pooled": jnp.asarray(rng.standard_normal((b, 4)), jnp.float32)}
    null = {"label": 10, "context": rng.standard_normal((length, 4)).astype(np.float32),
            "context_mask": np.array([True, True, False, False, False]),
            "pooled": rng.standard_normal(4).astype(np.float32)}
    key = jax.random.key(3)
    out = jax.tree.map(np.asarray, pairs.drop_conditions(key, cond, null, 0.3))
    dropped = out["label"] == 10
    assert 5 < dropped.sum() < 40
    expected = np.where(np.asarray(jax.random.uniform(key, (b,))) < 0.3, 10, np.asarray(cond["label"]))
    np.testing.assert_array_equal(out["label"], expected)
    for name in ("context", "context_mask", "pooled"):
        np.testing.assert_array_equal(out[name][dropped], np.broadcast_to(null[name], out[name][dropped].shape))
        np.testing.assert_array_equal(out[name][~dropped], np.asarray(cond[name])[~dropped])
    text_only = pairs.drop_conditions(key, {k: v for k, v in cond.items() if k != "label"}, null, 0.3)
    np.testing.assert_array_equal(text_only["pooled"], out["pooled"])  # the draw is per sample, whatever the keys
    no_null = pairs.drop_conditions(key, cond, {"label": 10}, 0.3)  # conditions without a null value stay
    np.testing.assert_array_equal(no_null["context"], cond["context"])


def test_labels_are_ignored_by_a_model_without_classes():
    model = DiT(**TINY_DIT, num_classes=0, class_dropout_prob=0.1)
    params = _random_params(model, jnp.zeros((1, 4, 4, 3)), jnp.zeros(1))
    loss_fn = jax.jit(functools.partial(steps.diffusion_loss_fn, model=model,
                                        objective=objectives.objective_from_config(default_config().diffusion, learn_sigma=False)))
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (8, 4, 4, 3)), jnp.float32)
    key = jax.random.key(0)
    with_labels = loss_fn(params, {}, {"image": images, "label": jnp.arange(8)}, key)[0]
    assert float(with_labels) == float(loss_fn(params, {}, {"image": images}, key)[0])


def test_a_text_model_without_text_in_the_batch_is_told_what_to_set():
    model = _text_dit()
    params = _random_params(model, jnp.zeros((1, 4, 4, 3)), jnp.zeros(1), _text_inputs(1))
    loss_fn = functools.partial(steps.diffusion_loss_fn, model=model,
                                objective=objectives.objective_from_config(default_config().diffusion, learn_sigma=False))
    with pytest.raises(ValueError, match=r"the DiT takes text \(context, context_mask, pooled.*text\.encoder_path"):
        loss_fn(params, {}, {"image": jnp.zeros((2, 4, 4, 3)), "label": jnp.zeros(2, jnp.int32)}, jax.random.key(0))


# --- captions in the data, cached text embeddings ----------------------------------------------------


def _digits_data(**overrides):
    return pipeline.resolve_config({
        **dict(source="digits", split="test", image_size=8, batch_size=8, shuffle=False, random_flip=False,
               num_threads=1, caption_template="the digit {name}", caption_class_names=DIGIT_NAMES,
               latent_sample=False),
        **overrides})


def test_captions_from_class_names_and_their_errors():
    source = pipeline.make_source(_digits_data())
    assert source[0]["caption"] == f"the digit {DIGIT_NAMES[source[0]['label']]}"
    assert source.class_names == tuple(str(d) for d in range(10))  # labels keep their names
    numbered = pipeline.make_source(_digits_data(caption_class_names=()))
    assert numbered[0]["caption"] == f"the digit {numbered[0]['label']}"  # the source's names
    with pytest.raises(ValueError, match=r"data.caption_template='the {digit}' must be a format string"):
        pipeline.make_source(_digits_data(caption_template="the {digit}"))
    with pytest.raises(ValueError, match="data.caption_class_names has 2 names for the 10 classes"):
        pipeline.make_source(_digits_data(caption_class_names=("a", "b")))


class LdmJaxCaptionedImages(tfds.core.GeneratorBasedBuilder):
    """4 tiny images with a caption each."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"image": tfds.features.Tensor(shape=(2, 2, 3), dtype=np.uint8), "text": tfds.features.Text()}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            yield i, {"image": np.full((2, 2, 3), 60 * i, np.uint8), "text": f"picture number {i}"}


def test_tfds_captions(tmp_path):
    LdmJaxCaptionedImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = sources.TfdsSource("ldm_jax_captioned_images", "train", str(tmp_path), label_key=None, caption_key="text")
    captions = {int(source[i]["image"][0, 0, 0]) // 60: source[i]["caption"] for i in range(len(source))}
    assert captions == {i: f"picture number {i}" for i in range(4)}
    with pytest.raises(ValueError, match="has no feature 'caption'"):
        sources.TfdsSource("ldm_jax_captioned_images", "train", str(tmp_path), label_key=None, caption_key="caption")


def _pool_encoder(images):
    """A stand-in VAE encoder: 2x2 average pooling, zero std -> [B, H/2, W/2, 3]."""
    b, h, w, c = images.shape
    pooled = images.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return pooled, jnp.zeros_like(pooled)


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory, text_encoder):
    """The 300 test digits with captions, cached by a stand-in VAE encoder and the tiny CLIP: (dir, meta)."""
    out_dir = str(tmp_path_factory.mktemp("text_cache"))
    meta = latent_cache.cache_latents(pipeline.make_source(_digits_data()), _pool_encoder, out_dir, image_size=8,
                                      downsample_factor=2, batch_size=8, sharding=_sharding(), flip=False,
                                      text=text_encoder)
    return out_dir, meta


def _sharding():
    return pipeline.batch_sharding(make_mesh({"data": -1}))


def test_cached_text_embeddings_give_the_loss_of_encoding_on_the_fly(text_cache, clip_paths, text_encoder):
    encoder, text_params = text_encoder
    cache_dir, meta = text_cache
    assert meta["text"] == encoder.describe() and meta["fields"] == ["label", "caption"]
    text_config = {**clip_paths, "max_length": MAX_LENGTH}
    cached = next(pipeline.make_pipeline(
        _digits_data(source="latents", path=cache_dir, caption_template="", latent_norm="scale"), _sharding(),
        text=text_config))
    on_the_fly = next(pipeline.make_pipeline(_digits_data(), _sharding(), text=text_config))  # the same 8 digits
    assert sorted(cached) == ["context", "context_mask", "label", "latent", "pooled"]
    assert sorted(on_the_fly) == ["attention_mask", "image", "input_ids", "label"]
    captions = [f"the digit {DIGIT_NAMES[label]}" for label in np.asarray(on_the_fly["label"])]
    np.testing.assert_array_equal(on_the_fly["input_ids"], encoder.tokenize(captions)[0])
    null = sources.LatentSource(cache_dir).empty_caption()
    for key, value in encoder.null_condition(text_params).items():
        np.testing.assert_allclose(null[key], value, atol=1e-6)

    model = _text_dit(class_dropout_prob=0.5)
    params = _random_params(model, jnp.zeros((1, 4, 4, 3)), jnp.zeros(1), _text_inputs(1))
    frozen = {"text_encoder": text_params, "null_text": null}
    loss_fn = jax.jit(functools.partial(steps.diffusion_loss_fn, model=model,
                                        objective=objectives.objective_from_config(default_config().diffusion, learn_sigma=False),
                                        encode_text=encoder))
    tokens = {"latent": cached["latent"], "input_ids": on_the_fly["input_ids"],
              "attention_mask": on_the_fly["attention_mask"]}
    key = jax.random.key(1)
    from_cache = float(loss_fn(params, frozen, cached, key)[0])
    from_tokens = float(loss_fn(params, frozen, tokens, key)[0])
    print(f"loss with cached text embeddings {from_cache:.7f}, encoded in the step {from_tokens:.7f}")
    assert abs(from_cache - from_tokens) <= 1e-5 * abs(from_tokens)
    other_text = dict(cached, pooled=jnp.roll(cached["pooled"], 1, axis=0))  # the text does change the loss
    assert abs(float(loss_fn(params, frozen, other_text, key)[0]) - from_cache) > 1e-4


def test_training_on_cached_text_needs_no_text_encoder(text_cache, clip_paths):
    cache_dir, _ = text_cache
    config = _config(clip_paths)
    config.text.update(encoder_path="", tokenizer_path="")
    config.data.update(source="latents", path=cache_dir, caption_template="", latent_sample=False, latent_norm="scale")
    config.model.update(input_size=4)
    config.train.update(preview_every=0)
    task = tasks.make_task(config)
    assert sorted(task.frozen) == ["null_text"]
    null = sources.LatentSource(cache_dir).empty_caption()
    for key in ("context", "context_mask", "pooled"):
        np.testing.assert_array_equal(task.frozen["null_text"][key], null[key])
    batch = next(pipeline.make_pipeline(config.data, _sharding(), text=config.text))
    params = nn.unbox(jax.jit(task.init_params)(jax.random.key(0)))
    assert np.isfinite(float(jax.jit(task.loss_fn)(params, task.frozen, batch, jax.random.key(1), 0)[0]))
    config.text.update(max_length=20)
    with pytest.raises(ValueError, match="text.max_length=20, but the latent cache data.path=.* holds captions of 16"):
        tasks.make_task(config)
    config.text.update(max_length=MAX_LENGTH, skip_last_layers=1, **clip_paths)  # previews would use another encoder
    with pytest.raises(ValueError, match=r"differ from the text encoder the latent cache .*\['skip_last_layers'\]"):
        tasks.make_task(config)


# --- training on digit captions, sampling with prompts -------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, clip_paths):
    """configs/t2i_digits.py trained TRAIN_STEPS steps on one device (captions encoded in the step);
    -> (config, exported bundle path, preview grid)."""
    config = _config(clip_paths)
    config.train.update(num_steps=TRAIN_STEPS)
    path = tmp_path_factory.mktemp("t2i") / "model"
    task, state = train_and_export(config, path)
    return config, path, task.preview(state.ema_params, task.frozen, jax.random.key(0))


@pytest.mark.slow
def test_text_conditioned_digits_show_the_digit_of_their_prompt(trained, tmp_path):
    config, path, preview = trained
    assert preview.shape == (10 * 8, 10 * 8, 3)  # row r: prompt r
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(config.sample.prompts) + "\n")
    config.sample.update(prompts=(), prompts_file=str(prompts_file), model_path=str(path),
                         out_dir=str(tmp_path / "out"), num_samples=200, batch_size=100)
    outputs = sampling.sample_from_config(config, str(tmp_path), devices=jax.devices()[:1])
    with np.load(outputs["samples"]) as samples:
        images, prompt_indices = samples["arr_0"], samples["arr_1"]
    np.testing.assert_array_equal(prompt_indices, np.arange(200) % 10)  # sample i: prompt i mod 10 = digit i mod 10
    classifier, _ = demo.digits_classifier(config.data)
    accuracy, per_digit = demo.conditional_accuracy(classifier, images, prompt_indices)
    print(f"{TRAIN_STEPS} steps: the classifier recognises the prompt's digit in {accuracy:.1%} of 200 samples; "
          "per digit " + " ".join(f"{d}:{a:.0%}" for d, a in enumerate(per_digit)))
    assert accuracy >= 0.8
    protocol = json.loads(open(outputs["protocol"]).read())["text"]
    assert protocol["prompts_file"] == str(prompts_file) and protocol["num_prompts"] == 10
    assert len(protocol["prompts_sha256"]) == 64 and "prompts" not in protocol


@pytest.mark.slow
def test_sample_command_takes_prompts_and_truncates_long_ones(trained, tmp_path, clip_paths, text_encoder):
    _, path, _ = trained
    encoder, text_params = text_encoder
    long_prompt = "the digit seven " * 4
    num_tokens = len(encoder.tokenizer.tokenize(long_prompt)) + 2  # bos, eos
    assert num_tokens > MAX_LENGTH
    command = [sys.executable, "-m", "ldm_jax.cli", "sample", "--config=configs/t2i_digits.py", f"--workdir={tmp_path}",
               f"--config.sample.model_path={path}", *[f"--config.text.{k}={v}" for k, v in clip_paths.items()],
               "--config.sample.num_steps=5", "--config.sample.grid_rows=2", "--config.sample.grid_cols=3",
               "--config.sample.batch_size=6", "--prompt=the digit three", f"--prompt={long_prompt}"]
    result = subprocess.run(command, cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.asarray(Image.open(tmp_path / "samples" / "grid.png")).shape == (2 * 8, 3 * 8, 3)
    assert result.stderr.count(f"has {num_tokens} tokens, more than max_length={MAX_LENGTH}: truncated") == 1
    protocol = json.loads((tmp_path / "samples" / "protocol.json").read_text())["text"]
    assert protocol["prompts"] == ["the digit three", long_prompt]
    assert protocol["weights_sha256"] == serialization.params_sha256(text_params)
    assert protocol["tokenizer_sha256"] == text_encoding.tokenizer_sha256(encoder.tokenizer)
    assert protocol["encoder_path"] == clip_paths["encoder_path"] and protocol["max_length"] == MAX_LENGTH


def _saved(tmp_path, model, *inputs):
    """A bundle of `model` with random params at tmp_path/model; -> its path."""
    params = _random_params(model, jnp.zeros((1, 4, 4, 3)), jnp.zeros(1), *inputs)
    serialization.save_model(tmp_path / "model", model, params)
    return tmp_path / "model"


def test_a_prompt_for_a_class_conditional_checkpoint_is_a_one_line_error(tmp_path):
    _saved(tmp_path, DiT(**TINY_DIT, num_classes=10), jnp.zeros(1, jnp.int32))
    result = subprocess.run([sys.executable, "-m", "ldm_jax.cli", "sample", "--config=configs/dit_digits.py",
                             f"--workdir={tmp_path}", "--prompt=the digit three"], cwd=ROOT, env=cpu_env(1),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "ldm-jax sample: error: ValueError: --prompt / sample.prompts: sample.model_path (unset: <workdir>/model)="
        f"{tmp_path / 'model'} is not text-conditioned (it takes ['label']); sample it without prompts")


@pytest.mark.parametrize("change, message", [
    (dict(), r"a DiT conditioned on \['context', 'context_mask', 'pooled'\] needs prompts \(--prompt"),
    (dict(prompts=("a",), prompts_file="prompts.txt"), r"set sample.prompts \(--prompt\) or sample.prompts_file"),
    (dict(prompts=("a",), text=False), r"needs prompts .* and its text encoder \(text.encoder_path"),
])
def test_text_checkpoint_sampling_errors_name_the_field(tmp_path, clip_paths, change, message):
    config, change = _config(clip_paths), dict(change)
    if not change.pop("text", True):
        config.text.update(encoder_path="", tokenizer_path="")
    config.sample.update(**{"prompts": (), **change, "model_path": str(_saved(tmp_path, _text_dit(), _text_inputs(1)))})
    with pytest.raises(ValueError, match=message):
        sampling.sample_from_config(config, str(tmp_path))


def test_a_condition_sampling_cannot_supply_is_named(tmp_path, clip_paths):
    model = DiT(**TINY_DIT, num_classes=0, concat_channels=2)
    config = _config(clip_paths)
    config.sample.update(model_path=str(_saved(tmp_path, model, {"concat": jnp.zeros((1, 4, 4, 2))})))
    with pytest.raises(ValueError, match=r"a DiT conditioned on \['concat'\]; `ldm-jax sample` samples"):
        sampling.sample_from_config(config, str(tmp_path))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.text.update(encoder_path="", tokenizer_path=""), "set text.encoder_path and text.tokenizer_path"),
    (lambda c: c.text.update(tokenizer_path=""), "text.tokenizer_path must be set too"),
    (lambda c: c.model.update(context_dim=48), r"model.context_dim=48, but the text embeddings of text.encoder_path"),
    (lambda c: c.text.update(max_length=78), r"text.max_length=78 must be in \[2, 77\]"),
    (lambda c: c.sample.update(prompts=()), r"train.preview_every=800: previews of a text-conditioned model need"),
])
def test_text_task_config_errors_name_the_field(clip_paths, change, message):
    config = _config(clip_paths)
    change(config)
    with pytest.raises(ValueError, match=message):
        tasks.make_task(config)
