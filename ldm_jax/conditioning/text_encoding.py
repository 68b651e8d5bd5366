"""Captions and prompts -> the DiT's text conditions, with a frozen CLIP text encoder.

    loaded = text_encoder_from_config(config.text)     # (TextEncoder, params), or None when unset
    encoder, params = loaded
    ids, mask = encoder.tokenize(["the digit seven"])  # host side: [B, L] int32 each
    cond = encoder(params, ids, mask)                  # jit-able: the dict below, [B, ...] arrays
    null = encoder.null_condition(params)              # the empty caption "", without a batch axis

    "context"      [B, L, D]  the encoder's last hidden state (after `skip_last_layers`, diffusers'
                              clip_skip) -> the DiT's cross-attention (`DiT.context_dim` = D)
    "context_mask" [B, L]     bool, False at padding: padding tokens get no cross-attention weight
    "pooled"       [B, D]     the pooled (eos-token) state of the same pass (`DiT.pooled_dim` = D)

A DiT takes the keys its config enables (`text_keys(model)`). The encoder runs without an attention
mask, as Stable Diffusion's does; its attention is causal, so the states of real tokens do not
depend on the padding, which the DiT's cross-attention masks out anyway.

The null condition of classifier-free guidance is the empty caption's embedding: caption dropout in
training substitutes it (training/steps.py), guidance pairs each sample with it at sampling time.

`config.text` fields: encoder_path (a `CLIPTextEncoder` model bundle, or a transformers
`CLIPTextModel` folder such as a Stable Diffusion repo's `text_encoder/`), tokenizer_path (a CLIP
tokenizer folder: vocab.json + merges.txt), max_length (tokens per caption, bos and eos included;
longer captions are truncated with a warning), skip_last_layers.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from ldm_jax import storage
from ldm_jax.convert.clip import clip_text_from_hf
from ldm_jax.data.tokenizer import CLIPTokenizer
from ldm_jax.models import serialization
from ldm_jax.models.clip import CLIPTextEncoder

TEXT_KEYS = ("context", "context_mask", "pooled")


def text_keys(model: Any) -> tuple[str, ...]:
    """The text conditions a DiT takes (`model.condition_fields()`), in `TEXT_KEYS` order."""
    fields = model.condition_fields()
    return tuple(key for key in TEXT_KEYS if key in fields)


def tokenizer_sha256(tokenizer: CLIPTokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: vocabulary, merge ranks and special tokens."""
    content = {
        "vocab": sorted(tokenizer.vocab.items()),
        "merges": sorted((rank, a, b) for (a, b), rank in tokenizer.ranks.items()),
        "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token],
    }
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """A CLIP tokenizer + text encoder module producing the DiT's text conditions (module docstring).

    Hashable by identity: it is a static argument of the jitted encoding.
    """

    module: CLIPTextEncoder
    tokenizer: CLIPTokenizer
    max_length: int = 77
    skip_last_layers: int = 0

    def __post_init__(self):
        positions = self.module.max_position_embeddings
        if not 2 <= self.max_length <= positions:
            raise ValueError(f"text.max_length={self.max_length} must be in [2, {positions}] (bos + eos, at most "
                             "the encoder's max_position_embeddings)")
        layers = self.module.num_hidden_layers
        if not 0 <= self.skip_last_layers < layers:
            raise ValueError(f"text.skip_last_layers={self.skip_last_layers} must be in [0, {layers}) (the "
                             "encoder's num_hidden_layers)")
        largest = max(self.tokenizer.vocab.values())
        if largest >= self.module.vocab_size:
            raise ValueError(f"text.tokenizer_path: the tokenizer has token id {largest}, beyond the encoder's "
                             f"vocab_size={self.module.vocab_size} (tokenizer and encoder do not belong together)")

    @property
    def width(self) -> int:
        """D: the width of "context" and "pooled"."""
        return self.module.hidden_size

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (input_ids, attention_mask), each [B, max_length] int32 (a warning names each
        truncated text)."""
        return self.tokenizer.encode(list(texts), self.max_length)

    def __call__(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> dict[str, jax.Array]:
        """input_ids, attention_mask [B, L] -> {"context" [B, L, D], "context_mask" [B, L] bool,
        "pooled" [B, D]} (float32)."""
        out = self.module.apply({"params": params}, input_ids, skip_last_layers=self.skip_last_layers)
        return {"context": out.last_hidden_state, "context_mask": attention_mask.astype(bool),
                "pooled": out.pooler_output}

    def encode_tokens(self, params: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """`self(...)` jitted, on host arrays -> numpy arrays."""
        return jax.tree.map(np.asarray, _encode(self, params, input_ids, attention_mask))

    def encode_texts(self, params: Any, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """texts [B] -> the conditions as numpy arrays [B, ...]."""
        return self.encode_tokens(params, *self.tokenize(texts))

    def null_condition(self, params: Any) -> dict[str, np.ndarray]:
        """The empty caption's conditions, one sample: {"context" [L, D], "context_mask" [L], "pooled" [D]}."""
        return {key: value[0] for key, value in self.encode_texts(params, [""]).items()}

    def describe(self) -> dict[str, Any]:
        """JSON-able settings that decide the embeddings (weights aside): for caches and protocols."""
        return {"encoder": serialization.module_config(self.module),
                "tokenizer_sha256": tokenizer_sha256(self.tokenizer), "max_length": self.max_length,
                "skip_last_layers": self.skip_last_layers, "width": self.width}


@functools.partial(jax.jit, static_argnums=0)
def _encode(encoder: TextEncoder, params, input_ids, attention_mask):
    return encoder(params, input_ids, attention_mask)


def load_clip_text_encoder(path: str) -> tuple[CLIPTextEncoder, Any]:
    """A `CLIPTextEncoder` model bundle (model.json) or a transformers `CLIPTextModel` folder ->
    (module, params)."""
    if storage.path(path).joinpath("model.json").is_file():
        module, params, _ = serialization.load_model(path)
        if not isinstance(module, CLIPTextEncoder):
            raise ValueError(f"text.encoder_path={path} holds a {type(module).__name__} bundle, not a "
                             "CLIPTextEncoder")
        return module, params
    return clip_text_from_hf(path)


def text_encoder_from_config(config: Mapping[str, Any] | None) -> tuple[TextEncoder, Any] | None:
    """The `text` config section -> (TextEncoder, params), or None when text.encoder_path is unset."""
    if not config or not (config.get("encoder_path") or config.get("tokenizer_path")):
        return None
    names = ("encoder_path", "tokenizer_path")
    missing = [f"text.{name}" for name in names if not config.get(name)]
    if missing:
        raise ValueError(f"{' and '.join(missing)} must be set too: text conditioning needs both the "
                         "text encoder and its tokenizer")
    for name in names:
        if not storage.path(config[name]).is_dir():
            raise FileNotFoundError(f"text.{name}={config[name]}: no such folder")
    module, params = load_clip_text_encoder(config["encoder_path"])
    tokenizer = CLIPTokenizer.from_folder(config["tokenizer_path"])
    encoder = TextEncoder(module, tokenizer, config["max_length"], config["skip_last_layers"])
    return encoder, params


def prompts_from_config(settings: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The `sample` section's prompts -> (prompts, what the protocol records of them).

    sample.prompts: a list of prompts (the CLI's --prompt); sample.prompts_file: a UTF-8 text file,
    one prompt per line (blank lines skipped), recorded by path and sha256. At most one of the two.
    """
    inline = [str(p) for p in settings["prompts"] or ()]
    path = settings["prompts_file"]
    if inline and path:
        raise ValueError("set sample.prompts (--prompt) or sample.prompts_file, not both")
    if not path:
        return inline, {"prompts": inline}
    content = storage.path(path).read_bytes()
    prompts = [line.strip() for line in content.decode("utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"sample.prompts_file={path} holds no prompt (one per line)")
    return prompts, {"prompts_file": os.fspath(storage.path(path)),  # absolute; a gs:// URI stays one
                     "prompts_sha256": hashlib.sha256(content).hexdigest(), "num_prompts": len(prompts)}


class PromptConditions:
    """Prompt indices -> the DiT's text conditions (only `keys`): index i is prompt i mod len(prompts).

    Every prompt is tokenized once, here (so a too-long prompt is warned about once); the encoder runs
    per call on the rows asked for.
    """

    def __init__(self, encoder: TextEncoder, params: Any, prompts: Sequence[str], keys: Sequence[str]):
        if not prompts:
            raise ValueError("no prompts to condition on")
        self.encoder, self.params, self.keys = encoder, params, tuple(keys)
        self.prompts = list(prompts)
        self.input_ids, self.attention_mask = encoder.tokenize(self.prompts)

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """indices [B] int -> {key: [B, ...]}."""
        rows = np.asarray(indices) % len(self.prompts)
        out = self.encoder.encode_tokens(self.params, self.input_ids[rows], self.attention_mask[rows])
        return {key: out[key] for key in self.keys}

    def null(self) -> dict[str, np.ndarray]:
        """The empty caption's conditions (only `keys`), without a batch axis."""
        null = self.encoder.null_condition(self.params)
        return {key: null[key] for key in self.keys}
