"""AF2's audio transformer: 3 post-LN self-attention layers over all audio tokens of a sample, RoPE across windows.

    x <- LayerNorm(x * sqrt(C))                                      (eps 1e-6; no final norm after the layers)
    per layer:  x <- LN(x + W_o MHA(x))      q/k/v/o without bias; RoPE (base 4096, NeoX halves) on the first
                                              rotary_dim = max(d_k // 2, 32) dims of each head of q and k, positions
                                              0..N-1 running across windows (padded windows included)
                x <- LN(x + W_2 ReLU(W_1 x + b_1) + b_2)
Padded keys get -1e9 (a key-padding mask, not causal); padded query rows are computed and carry no meaning.
In training mode (`deterministic=False`) the reference's dropouts apply: attention probabilities (its class default
0.1) and `dropout` (0.0 in AF2) on the residual branches and the scaled input.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax import sharding
from af2_jax.models import rope
from af2_jax.models import scan as scan_lib
from af2_jax.models.attention import softmax_attention
from af2_jax.models.layers import Dense, LayerNorm, dropout


@dataclasses.dataclass(frozen=True)
class AudioTransformerConfig:
    d_model: int = 2048
    n_layers: int = 3
    n_heads: int = 8
    d_k: int = 256  # = d_v
    d_inner: int = 2048
    rope_base: float = 4096.0
    eps: float = 1e-6
    dropout: float = 0.0
    attention_dropout: float = 0.1  # ScaledDotProductAttention's default in the reference; training only
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.rotary_dim > self.d_k:
            raise ValueError(f"rotary_dim {self.rotary_dim} exceeds d_k {self.d_k}")
        if self.remat_policy not in scan_lib.REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat_policy!r}")

    @property
    def rotary_dim(self) -> int:
        return max(self.d_k // 2, 32)


_PRESETS = {
    "large": dict(d_model=2048, n_heads=8, d_k=256, d_inner=2048),
    "tiny": dict(d_model=128, n_heads=2, d_k=64, d_inner=256),  # the golden fixture af2_tiny
}


def audio_transformer_preset(name: str, **overrides) -> AudioTransformerConfig:
    if name not in _PRESETS:
        raise ValueError(f"unknown audio transformer preset {name!r}; choose one of {sorted(_PRESETS)}")
    return AudioTransformerConfig(**{**_PRESETS[name], **overrides})


class SelfAttention(nnx.Module):
    def __init__(self, config: AudioTransformerConfig, *, rngs: nnx.Rngs):
        c = config
        inner = c.n_heads * c.d_k
        kw = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.config = c
        self.query = Dense(c.d_model, inner, ("audio_embed", "audio_heads"), **kw)
        self.key = Dense(c.d_model, inner, ("audio_embed", "audio_heads"), **kw)
        self.value = Dense(c.d_model, inner, ("audio_embed", "audio_heads"), **kw)
        self.out = Dense(inner, c.d_model, ("audio_heads", "audio_embed"), **kw)

    def __call__(self, x: jax.Array, valid: jax.Array, positions: jax.Array, key: jax.Array | None) -> jax.Array:
        c = self.config
        b, n, _ = x.shape
        q, k, v = (scan_lib.tag(proj(x), name).reshape(b, n, c.n_heads, c.d_k) for proj, name in
                   ((self.query, "query_proj"), (self.key, "key_proj"), (self.value, "value_proj")))
        q = rope.apply_rotary(q, positions, base=c.rope_base, rotary_dim=c.rotary_dim)
        k = rope.apply_rotary(k, positions, base=c.rope_base, rotary_dim=c.rotary_dim)
        q = q / jnp.asarray(np.sqrt(c.d_k), q.dtype)
        out = softmax_attention(q, k, v, dtype=c.dtype, allowed=valid[:, None, None, :], masked_logit=-1e9,
                                dropout_rate=c.attention_dropout, dropout_key=key)  # masked_fill, as the reference
        out = out.reshape(b, n, c.n_heads * c.d_k)
        return scan_lib.tag(self.out(out), "out_proj")


class EncoderLayer(nnx.Module):
    def __init__(self, config: AudioTransformerConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.attention = SelfAttention(c, rngs=rngs)
        self.attention_norm = LayerNorm(c.d_model, eps=c.eps, param_dtype=c.param_dtype)
        kw = dict(use_bias=True, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.ffn = nnx.Dict(w1=Dense(c.d_model, c.d_inner, ("audio_embed", "audio_mlp"), **kw),
                            w2=Dense(c.d_inner, c.d_model, ("audio_mlp", "audio_embed"), **kw))
        self.ffn_norm = LayerNorm(c.d_model, eps=c.eps, param_dtype=c.param_dtype)

    def __call__(self, x: jax.Array, valid: jax.Array, positions: jax.Array, key: jax.Array | None) -> jax.Array:
        c = self.config
        keys = jax.random.split(key, 3) if key is not None else (None,) * 3
        h = dropout(self.attention(x, valid, positions, keys[0]), c.dropout, keys[1])
        x = self.attention_norm(h.astype(jnp.float32) + x).astype(x.dtype)
        h = jax.nn.relu(scan_lib.tag(self.ffn["w1"](x), "mlp_in"))
        h = sharding.constrain(h, ("act_batch", "act_length", "act_mlp"))
        h = dropout(scan_lib.tag(self.ffn["w2"](h), "mlp_out"), c.dropout, keys[2])
        x = self.ffn_norm(h.astype(jnp.float32) + x).astype(x.dtype)
        return sharding.constrain(x, ("act_batch", "act_length", "act_embed"))


class AudioTransformer(nnx.Module):
    def __init__(self, config: AudioTransformerConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.input_norm = LayerNorm(c.d_model, eps=c.eps, param_dtype=c.param_dtype)
        self.layers = scan_lib.stack(lambda r: EncoderLayer(c, rngs=r), c.n_layers, rngs)

    def embed(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """x * sqrt(C), then the input LayerNorm (the reference's `at_input_ln`), fp32."""
        x = x.astype(jnp.float32) * np.float32(np.sqrt(self.config.d_model))
        return self.input_norm(dropout(x, self.config.dropout, key))

    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None,
                 num_layers: int | None = None) -> jax.Array:
        """x (B, N, C) audio tokens (windows concatenated), mask (B, N) nonzero = valid token -> (B, N, C).

        `num_layers` runs only the first layers (to inspect intermediate outputs); default all."""
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.d_model:
            raise ValueError(f"x must be (batch, tokens, {c.d_model}), got {x.shape}")
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must be (batch, tokens) = {x.shape[:2]}, got {mask.shape}")
        keys = None
        if not deterministic:
            if rngs is None:
                raise ValueError("AudioTransformer with deterministic=False needs rngs for dropout")
            keys = jax.random.split(rngs.dropout(), c.n_layers + 1)
        h = self.embed(x, key=None if keys is None else keys[-1]).astype(c.dtype)
        h = sharding.constrain(h, ("act_batch", "act_length", "act_embed"))
        valid = mask != 0
        positions = jnp.arange(x.shape[1])
        layers = self.layers
        count = c.n_layers if num_layers is None else num_layers
        if not 0 <= count <= c.n_layers:
            raise ValueError(f"num_layers must be in [0, {c.n_layers}], got {num_layers}")
        if count == 0:
            return h
        if count < c.n_layers:
            graphdef, state = nnx.split(layers)
            layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[:count], state))
        layer_keys = None if keys is None else keys[:count]

        def body(layer, carry, key):
            return layer(carry, valid, positions, key), None

        h, _ = scan_lib.scan(layers, body, h, layer_keys, remat_policy=c.remat_policy)
        return h
