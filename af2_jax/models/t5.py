"""The T5 (Flan-T5) encoder, AF-CLAP's text branch, in Flax NNX.

Numerically it follows transformers' `T5EncoderModel` with `feed_forward_proj='gated-gelu'` (afclap_reference.md
section 1):
  embed       token embedding, no scaling
  N blocks    x + o(attention(RMSNorm x)), then x + wo(gelu_tanh(wi_0 h) * wi_1 h) with h = RMSNorm x
  attention   no 1/sqrt(d_kv) scaling; one relative-position bias (block 0's table, bidirectional buckets) computed
              once and added in every block, plus an additive mask on padded keys
  final       RMSNorm (fp32 statistics, no mean, no bias); no biases anywhere
The blocks are stacked on a leading 'layers' axis and run with `af2_jax.models.scan`. Dropout (at transformers'
places: embedding, attention probabilities, each residual branch, the gated FF hidden, the output) runs only when
`deterministic=False`, with the key from `rngs.dropout()`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax import sharding
from af2_jax.models import scan
from af2_jax.models.attention import softmax_attention
from af2_jax.models.layers import Dense, RMSNorm, dropout


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    num_layers: int
    d_ff: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32  # compute
    param_dtype: Any = jnp.float32  # storage
    remat_policy: str = "none"  # af2_jax.models.scan.REMAT_POLICIES
    scan_unroll: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "num_heads", "num_layers", "d_ff",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("bidirectional buckets need relative_attention_num_buckets >= 4")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.remat_policy not in scan.REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose one of {sorted(scan.REMAT_POLICIES)}")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "T5Config":
        """From the fields of an HF T5 config.json (only the gated-GELU encoder is supported)."""
        proj = hf.get("feed_forward_proj", "relu")
        if proj != "gated-gelu":
            raise ValueError(f"config.json: feed_forward_proj {proj!r} is not supported (only 'gated-gelu', Flan-T5)")
        fields = dict(vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"],
                      num_heads=hf["num_heads"], num_layers=hf["num_layers"], d_ff=hf["d_ff"],
                      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
                      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
                      layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
                      dropout_rate=float(hf.get("dropout_rate", 0.1)))
        fields.update(overrides)
        return cls(**fields)


T5_PRESETS: dict[str, dict] = {
    # google/flan-t5-large's encoder (afclap_reference.md section 1)
    "flan-t5-large": dict(vocab_size=32128, d_model=1024, d_kv=64, num_heads=16, num_layers=24, d_ff=2816),
    # the golden fixture afclap_tiny (config.json -> t5_config): width 1024 because AF-CLAP's text projection reads
    # 1024 inputs
    "tiny": dict(vocab_size=128, d_model=1024, d_kv=16, num_heads=2, num_layers=2, d_ff=64),
}


def t5_preset(name: str, **overrides) -> T5Config:
    if name not in T5_PRESETS:
        raise KeyError(f"unknown T5 preset {name!r}; choose one of {sorted(T5_PRESETS)}")
    return T5Config(**{**T5_PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------------------------
# relative positions (structural constants, numpy)

def relative_position_buckets(query_length: int, key_length: int, num_buckets: int = 32,
                              max_distance: int = 128) -> np.ndarray:
    """(query_length, key_length) int32 bucket of each (query i, key j), bidirectional as in a T5 encoder:
    half the buckets per sign of j - i (positive distances in the upper half), exact for |j - i| < num_buckets / 4,
    then logarithmic up to max_distance, clamped to the last bucket. The log is taken in float32 and truncated, as
    torch does, so boundary distances land in the same bucket."""
    rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) for the exact buckets, discarded below
        scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
                  * np.float32(half - max_exact))
    large = max_exact + np.where(rel < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# modules

def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class T5Attention(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        dense = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        # transformers' T5 initialisation scales
        self.query = Dense(c.d_model, c.inner_dim, ("embed", "heads"), init=_normal((c.d_model * c.d_kv) ** -0.5),
                           **dense)
        self.key = Dense(c.d_model, c.inner_dim, ("embed", "heads"), init=_normal(c.d_model ** -0.5), **dense)
        self.value = Dense(c.d_model, c.inner_dim, ("embed", "heads"), init=_normal(c.d_model ** -0.5), **dense)
        self.out = Dense(c.inner_dim, c.d_model, ("heads", "embed"), init=_normal(c.inner_dim ** -0.5), **dense)

    def __call__(self, h: jax.Array, bias: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """h (B, L, D); bias (B or 1, heads, L, L) fp32 = position bias + pad-key mask -> (B, L, D)."""
        c = self.config
        b, length, _ = h.shape
        q = self.query(h).reshape(b, length, c.num_heads, c.d_kv)
        k = self.key(h).reshape(b, length, c.num_heads, c.d_kv)
        v = self.value(h).reshape(b, length, c.num_heads, c.d_kv)
        out = softmax_attention(q, k, v, dtype=c.dtype, biases=(bias,), dropout_rate=c.dropout_rate,
                                dropout_key=key)  # T5 does not scale by 1/sqrt(d)
        out = out.reshape(b, length, c.inner_dim)
        return self.out(out)


class T5GatedFeedForward(nnx.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x) (transformers' gelu_new is the tanh approximation)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        dense = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.wi_0 = Dense(c.d_model, c.d_ff, ("embed", "mlp"), init=_normal(c.d_model ** -0.5), **dense)
        self.wi_1 = Dense(c.d_model, c.d_ff, ("embed", "mlp"), init=_normal(c.d_model ** -0.5), **dense)
        self.wo = Dense(c.d_ff, c.d_model, ("mlp", "embed"), init=_normal(c.d_ff ** -0.5), **dense)

    def __call__(self, h: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        gated = jax.nn.gelu(self.wi_0(h), approximate=True) * self.wi_1(h)
        gated = sharding.constrain(gated, ("act_batch", "act_length", "act_mlp"))
        return self.wo(dropout(gated, self.config.dropout_rate, key))


class T5Block(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.attention_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype)
        self.attention = T5Attention(c, rngs=rngs)
        self.ff_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype)
        self.ff = T5GatedFeedForward(c, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        rate = self.config.dropout_rate
        keys = jax.random.split(key, 4) if key is not None else [None] * 4
        x = x + dropout(self.attention(self.attention_norm(x), bias, key=keys[0]), rate, keys[1])
        x = x + dropout(self.ff(self.ff_norm(x), key=keys[2]), rate, keys[3])
        return sharding.constrain(x, ("act_batch", "act_length", "act_embed"))


class T5Encoder(nnx.Module):
    """input_ids (B, L), attention_mask (B, L) -> last_hidden_state (B, L, d_model)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed_tokens = nnx.Param(_normal(1.0)(rngs.params(), (c.vocab_size, c.d_model), c.param_dtype),
                                      out_sharding=("vocab", "embed"))
        # block 0's table in the reference; every block reads it
        self.relative_attention_bias = nnx.Param(
            _normal(c.d_model ** -0.5)(rngs.params(), (c.relative_attention_num_buckets, c.num_heads), c.param_dtype),
            out_sharding=("bias_table", "heads"))
        self.layers = scan.stack(lambda r: T5Block(c, rngs=r), c.num_layers, rngs)
        self.final_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype)

    def position_bias(self, length: int) -> jax.Array:
        """(heads, length, length) fp32 relative-position bias (query, key)."""
        c = self.config
        buckets = relative_position_buckets(length, length, c.relative_attention_num_buckets,
                                            c.relative_attention_max_distance)
        return jnp.moveaxis(self.relative_attention_bias[...].astype(jnp.float32)[buckets], -1, 0)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, return_block_outputs: bool = False):
        """-> last_hidden_state (B, L, d_model); with `return_block_outputs` also every block's output
        (num_layers, B, L, d_model), before the final norm."""
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {attention_mask.shape} does not match input_ids {input_ids.shape}")
        if not deterministic and rngs is None and c.dropout_rate > 0:
            raise ValueError("T5Encoder with deterministic=False needs rngs (dropout)")
        keys = None
        if not deterministic and c.dropout_rate > 0:
            keys = jax.random.split(rngs.dropout(), c.num_layers + 2)
        length = input_ids.shape[1]
        # transformers adds finfo.min to padded keys (finite: a row of only padded keys stays uniform, not NaN)
        pad = jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        bias = self.position_bias(length)[None] + pad[:, None, None, :]  # (B, heads, L, L)
        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(c.dtype)
        h = dropout(h, c.dropout_rate, None if keys is None else keys[-2])
        h = sharding.constrain(h, ("act_batch", "act_length", "act_embed"))

        def body(layer, carry, key):
            out = layer(carry, bias, key=key)
            return out, out if return_block_outputs else None

        h, block_outputs = scan.scan(self.layers, body, h, None if keys is None else keys[:c.num_layers],
                                     remat_policy=c.remat_policy, unroll=c.scan_unroll)
        h = dropout(self.final_norm(h), c.dropout_rate, None if keys is None else keys[-1])
        return (h, block_outputs) if return_block_outputs else h
