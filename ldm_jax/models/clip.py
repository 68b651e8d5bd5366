"""CLIP's text tower (the prompt encoder of Stable Diffusion 1.x/2.x), Flax Linen.

Matches transformers' `CLIPTextModel` operation for operation, so Hugging Face weights load
unchanged (`ldm_jax.convert.clip`); field names are `CLIPTextConfig`'s:

    ids [B, L] -> token_embedding(ids) + position_embedding(0..L-1)                   -> [B, L, D]
    num_hidden_layers x pre-LN block, causal self-attention (+ optional padding mask):
        x += out_proj(attention(q_proj, k_proj, v_proj of layer_norm1(x)))
        x += fc2(act(fc1(layer_norm2(x))))        act: quick_gelu (SD 1.x) / gelu (SD 2.x)
    last_hidden_state = final_layer_norm(x); pooler_output = its state at the eos token

Pooling follows transformers: with the legacy `eos_token_id == 2` of older configs (the Stable
Diffusion repos' among them) the pooled position is the argmax of the ids (eos has the highest id
in CLIP's vocabulary); otherwise it is the first position holding `eos_token_id`.

`skip_last_layers=k` stops after `num_hidden_layers - k` blocks and applies the final layer norm
there: diffusers' `clip_skip=k`. Stable Diffusion 2.x's converted text encoders already drop the
last OpenCLIP block (23 layers), so they use `k=0`. `hidden_states` holds the embeddings and every
computed block's output ([-2] is transformers' penultimate `hidden_states[-2]`).

Parameter layout (what `ldm_jax.convert.clip` produces):

    token_embedding/embedding_table [vocab_size, D], position_embedding/embedding_table [P, D]
    layers_i/layer_norm1, layer_norm2, final_layer_norm: {scale [D], bias [D]}
    layers_i/self_attn/{q,k,v}_proj {kernel [D, H, Dh], bias [H, Dh]}
    layers_i/self_attn/out_proj {kernel [H, Dh, D], bias [D]}
    layers_i/mlp/fc1 {kernel [D, I]}, layers_i/mlp/fc2 {kernel [I, D]}

Parameters are float32 (`layers.Linear` / `LabelEmbedder` store float32); `dtype` is the compute
dtype; outputs are float32.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import (
    ACTIVATION_AXES,
    HEAD_ACTIVATION_AXES,
    LabelEmbedder,
    Linear,
    partitioned,
)

Dtype = Any

NORM_AXES = ("norm",)
MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")
LEGACY_EOS_TOKEN_ID = 2  # transformers < 4.31 configs: pool at argmax(input_ids)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"quick_gelu": quick_gelu, "gelu": _gelu}


@flax.struct.dataclass
class CLIPTextOutput:
    """float32 outputs. last_hidden_state [B, L, D] (after final_layer_norm); pooler_output [B, D];
    hidden_states: (embeddings, block 1, ..., last computed block), each [B, L, D], not normed."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        use_fast_variance=False,  # two-pass variance, as torch.nn.LayerNorm
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=partitioned(nn.initializers.ones, NORM_AXES),
        bias_init=partitioned(nn.initializers.zeros, NORM_AXES),
        name=name,
    )


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (transformers' layout).

    x: [B, L, D]; key_mask: [B, 1, 1, L] bool (False = padding key) or None -> [B, L, D].
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        d = x.shape[-1]
        heads = (self.num_heads, d // self.num_heads)
        q, k, v = (
            nn.with_logical_constraint(
                Linear(heads, ("embed", "heads", "kv"), dtype=self.dtype, name=f"{n}_proj")(x),
                HEAD_ACTIVATION_AXES,
            )
            for n in "qkv"
        )
        out = jax.nn.dot_product_attention(q, k, v, mask=key_mask, is_causal=True)
        out_proj = Linear(d, ("heads", "kv", "embed"), in_dims=2, dtype=self.dtype, name="out_proj")
        return out_proj(out)


class CLIPMlp(nn.Module):
    """x: [B, L, D] -> fc1 (D -> intermediate_size) -> activation -> fc2 -> [B, L, D]."""

    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Linear(self.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        h = nn.with_logical_constraint(ACTIVATIONS[self.hidden_act](h), MLP_AXES)
        return Linear(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block. x: [B, L, D], key_mask as `CLIPAttention` -> [B, L, D]."""

    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        attn = CLIPAttention(self.num_heads, dtype=self.dtype, name="self_attn")
        x = x + attn(_layer_norm(self.layer_norm_eps, self.dtype, "layer_norm1")(x), key_mask)
        mlp = CLIPMlp(self.intermediate_size, self.hidden_act, dtype=self.dtype, name="mlp")
        x = x + mlp(_layer_norm(self.layer_norm_eps, self.dtype, "layer_norm2")(x))
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer. __call__(input_ids [B, L] int, attention_mask [B, L] | None,
    skip_last_layers=0) -> `CLIPTextOutput`; L <= max_position_embeddings.

    `attention_mask` (1 = token, 0 = padding) hides padding keys on top of the causal mask; Stable
    Diffusion encodes prompts without it. Defaults are Stable Diffusion 1.x's text encoder
    (openai/clip-vit-large-patch14).
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLIPTextEncoder.{field}={value!r} must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextEncoder.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIPTextEncoder.hidden_act={self.hidden_act!r} is not one of {tuple(ACTIVATIONS)}"
            )
        if not isinstance(self.eos_token_id, int) or not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"CLIPTextEncoder.eos_token_id={self.eos_token_id!r} must be an id below "
                f"vocab_size={self.vocab_size}"
            )
        super().__post_init__()

    def _check_inputs(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, skip_last_layers: int
    ) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPTextEncoder input_ids must be [B, L], got {input_ids.shape}")
        if input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(
                f"CLIPTextEncoder input has {input_ids.shape[1]} tokens, more than "
                f"max_position_embeddings={self.max_position_embeddings}"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"CLIPTextEncoder attention_mask must have the shape of input_ids "
                f"{input_ids.shape}, got {attention_mask.shape}"
            )
        if not 0 <= skip_last_layers < self.num_hidden_layers:
            raise ValueError(
                f"skip_last_layers={skip_last_layers} must be in [0, num_hidden_layers="
                f"{self.num_hidden_layers})"
            )

    def pooled_positions(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, L] -> [B] int: where transformers' CLIPTextModel pools."""
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.eos_token_id, axis=-1)

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        skip_last_layers: int = 0,
    ) -> CLIPTextOutput:
        self._check_inputs(input_ids, attention_mask, skip_last_layers)
        d, length = self.hidden_size, input_ids.shape[1]
        tokens = LabelEmbedder(self.vocab_size, d, False, self.dtype, name="token_embedding")
        positions = LabelEmbedder(
            self.max_position_embeddings, d, False, self.dtype, name="position_embedding"
        )
        x = tokens(input_ids) + positions(jnp.arange(length))[None]
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.astype(bool)[:, None, None, :]
        hidden_states = [x]
        for i in range(self.num_hidden_layers - skip_last_layers):
            x = CLIPEncoderLayer(
                self.num_attention_heads,
                self.intermediate_size,
                self.hidden_act,
                self.layer_norm_eps,
                self.dtype,
                name=f"layers_{i}",
            )(x, key_mask)
            hidden_states.append(x)

        last = _layer_norm(self.layer_norm_eps, self.dtype, "final_layer_norm")(x)
        last = last.astype(jnp.float32)
        pooled = jnp.take_along_axis(
            last, self.pooled_positions(input_ids)[:, None, None], axis=1
        )[:, 0]
        return CLIPTextOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=tuple(h.astype(jnp.float32) for h in hidden_states),
        )
