"""Qwen2 / Qwen2.5 decoder-only language model (the LLM of AF2), Flax NNX.

Numerically it follows transformers' `Qwen2ForCausalLM`: pre-RMSNorm blocks, GQA self-attention with q/k/v bias and
no o bias, NeoX RoPE over the whole head, SwiGLU MLP, final RMSNorm, tied or separate output head.

Attention uses `jax.nn.dot_product_attention` with an explicit boolean mask (B, 1, T, S): left padding and the KV
cache need an arbitrary per-row key mask, which the sequence-length arguments (and cuDNN's fused path) cannot
express. The XLA path masks with a large finite negative value, so fully masked rows (the padded query positions of
a left-padded prompt) give finite garbage, never NaN; their outputs are never read.

Left-padded batches behave as in transformers' `generate`: positions are `cumsum(mask) - 1` over the tokens seen
so far (padding gets position 1, its value is irrelevant), and padded keys are masked for every query. The KV cache
holds every layer's keys/values in slots (layers, B, max_len, kv_heads, head_dim); all rows write the same slot
range, and `valid` marks which slots hold real tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax import sharding
from af2_jax.models import scan
from af2_jax.models.layers import RMSNorm
from af2_jax.models.rope import apply_rotary

_INIT = nnx.initializers.normal(stddev=0.02)  # transformers' initializer_range for Qwen2


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None -> hidden_size // num_heads (filled in at construction)
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    dtype: Any = jnp.float32  # compute
    param_dtype: Any = jnp.float32  # storage (also the dtype written on export to HF)
    remat_policy: str = "none"
    scan_unroll: bool = False
    # jax.nn.dot_product_attention's `implementation`: None lets XLA choose; 'cudnn' is the fused GPU kernel (bf16,
    # 1.8x XLA at 512 tokens, docs/PERFORMANCE.md); 'xla' forces the plain one.
    attention_implementation: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Qwen2Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.remat_policy not in scan.REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose one of {sorted(scan.REMAT_POLICIES)}")
        if self.attention_implementation not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_implementation must be None, 'xla' or 'cudnn', got "
                             f"{self.attention_implementation!r}")

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Qwen2Config":
        """From the fields of an HF Qwen2 config.json (transformers 4.x or 5.x layout)."""
        if hf.get("model_type", "qwen2") != "qwen2":
            raise ValueError(f"config.json: model_type is {hf.get('model_type')!r}, expected 'qwen2'")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise ValueError(f"config.json: only default RoPE is supported, got rope_parameters={rope} "
                             f"rope_scaling={hf.get('rope_scaling')}")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        hf_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        fields = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim"),
            rope_theta=float(theta), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            param_dtype=getattr(jnp, hf_dtype))
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict:
        """HF config.json fields that `transformers.Qwen2ForCausalLM.from_pretrained` reads."""
        hf = {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu", "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": self.num_layers, "attention_dropout": 0.0, "use_cache": True,
            "dtype": jnp.dtype(self.param_dtype).name,
        }
        if self.head_dim != self.hidden_size // self.num_heads:
            hf["head_dim"] = self.head_dim
        return hf


_QWEN25 = dict(rope_theta=1e6, rms_norm_eps=1e-6)
QWEN2_PRESETS: dict[str, dict] = {
    # published Qwen2.5 base shapes (af2_reference.md section 5); AF2 resizes the vocabulary to 151669
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=32768, **_QWEN25),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=131072, **_QWEN25),
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
                       num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=32768, **_QWEN25),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, tie_word_embeddings=False, max_position_embeddings=131072, **_QWEN25),
    # the golden fixture's LM (../shared/fixtures/af2_tiny): vocab 320 resized to 300
    "tiny": dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                 tie_word_embeddings=True, max_position_embeddings=512, **_QWEN25),
    "tiny-untied": dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=1, tie_word_embeddings=False, max_position_embeddings=512, **_QWEN25),
}


def qwen2_preset(name: str, **overrides) -> Qwen2Config:
    """A preset's config with fields overridden, e.g. `qwen2_preset('qwen2.5-3b', vocab_size=151669)`."""
    if name not in QWEN2_PRESETS:
        raise KeyError(f"unknown Qwen2 preset {name!r}; choose one of {sorted(QWEN2_PRESETS)}")
    return Qwen2Config(**{**QWEN2_PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------------------------
# KV cache, positions and masks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of every layer: k, v (layers, B, max_len, kv_heads, head_dim); `valid` (B, max_len) marks the
    slots that hold real (non-padding) tokens; `index` () int32 is the next slot to write (same for all rows).

    Inside the layer scan each decoder layer sees the same type without the leading layers axis.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[-1]


# a cache is split like the activations it holds: rows over the data axes, heads over tensor
CACHE_AXES = ("layers", "act_batch", "act_length", "act_heads", None)


def init_cache(config: Qwen2Config, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
    dtype = config.dtype if dtype is None else dtype
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    k, v = (sharding.constrain(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(2))
    return KVCache(k=k, v=v, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


def positions_from_attention_mask(mask: jax.Array) -> jax.Array:
    """Position ids of a (left-)padded batch as transformers computes them: cumsum(mask) - 1, padding -> 1."""
    mask = mask.astype(bool)
    positions = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    return jnp.where(mask, positions, 1)


def causal_attention_mask(key_valid: jax.Array, query_len: int, query_offset: jax.Array | int = 0) -> jax.Array:
    """(B, T, S) bool: query t (at slot query_offset + t) may attend key slot s iff s <= its slot and key s is valid."""
    key_slots = jnp.arange(key_valid.shape[-1])
    query_slots = query_offset + jnp.arange(query_len)
    return key_valid.astype(bool)[:, None, :] & (key_slots[None, None, :] <= query_slots[None, :, None])


def attention_inputs(attention_mask: jax.Array, cache: KVCache | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(positions (B, T), mask (B, T, S), key_valid (B, S)) for a chunk of T tokens with its (B, T) attention mask.

    Without a cache S = T. With a cache the chunk goes to slots [index, index + T) and positions continue from the
    real tokens already cached (prefill and single-token decode alike).
    """
    attention_mask = attention_mask.astype(bool)
    query_len = attention_mask.shape[1]
    if cache is None:
        return positions_from_attention_mask(attention_mask), causal_attention_mask(attention_mask, query_len), \
            attention_mask
    key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
    positions = jax.lax.dynamic_slice_in_dim(positions_from_attention_mask(key_valid), cache.index, query_len, 1)
    return positions, causal_attention_mask(key_valid, query_len, cache.index), key_valid


# ---------------------------------------------------------------------------------------------------------------
# modules


def _linear(config: Qwen2Config, din: int, dout: int, axes: tuple[str, str], *, bias: bool,
            rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=config.dtype, param_dtype=config.param_dtype,
                      kernel_init=_INIT, kernel_metadata={"out_sharding": axes},
                      bias_metadata={"out_sharding": (axes[1],)}, rngs=rngs)


class Qwen2Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; writes its keys/values into the cache when one is given."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.q_proj = _linear(c, c.hidden_size, c.num_heads * c.head_dim, ("embed", "heads"), bias=True, rngs=rngs)
        self.k_proj = _linear(c, c.hidden_size, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), bias=True,
                              rngs=rngs)
        self.v_proj = _linear(c, c.hidden_size, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), bias=True,
                              rngs=rngs)
        self.o_proj = _linear(c, c.num_heads * c.head_dim, c.hidden_size, ("heads", "embed"), bias=False, rngs=rngs)

    def __call__(self, h: jax.Array, *, positions: jax.Array, mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """h (B, T, hidden), positions (B, T), mask (B, T, S) -> ((B, T, hidden), cache with this chunk written)."""
        c = self.config
        batch, length, _ = h.shape
        q = scan.tag(self.q_proj(h), "query_proj").reshape(batch, length, c.num_heads, c.head_dim)
        k = scan.tag(self.k_proj(h), "key_proj").reshape(batch, length, c.num_kv_heads, c.head_dim)
        v = scan.tag(self.v_proj(h), "value_proj").reshape(batch, length, c.num_kv_heads, c.head_dim)
        q = apply_rotary(q, positions, base=c.rope_theta)
        k = apply_rotary(k, positions, base=c.rope_theta)
        if cache is not None:
            start = (0, cache.index, 0, 0)
            cache = dataclasses.replace(cache, k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                                        v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start))
            k, v = cache.k.astype(q.dtype), cache.v.astype(q.dtype)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], scale=c.head_dim ** -0.5,
                                           implementation=c.attention_implementation)
        out = sharding.constrain(out, ("act_batch", "act_length", "act_heads", None))
        return scan.tag(self.o_proj(out.reshape(batch, length, c.num_heads * c.head_dim)), "out_proj"), cache


class Qwen2MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        c = config
        self.gate_proj = _linear(c, c.hidden_size, c.intermediate_size, ("embed", "mlp"), bias=False, rngs=rngs)
        self.up_proj = _linear(c, c.hidden_size, c.intermediate_size, ("embed", "mlp"), bias=False, rngs=rngs)
        self.down_proj = _linear(c, c.intermediate_size, c.hidden_size, ("mlp", "embed"), bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        inner = jax.nn.silu(scan.tag(self.gate_proj(x), "mlp_in")) * scan.tag(self.up_proj(x), "mlp_in")
        inner = sharding.constrain(inner, ("act_batch", "act_length", "act_mlp"))
        return scan.tag(self.down_proj(inner), "mlp_out")


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        self.self_attn = Qwen2Attention(c, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=c.dtype,
                                                param_dtype=c.param_dtype)
        self.mlp = Qwen2MLP(c, rngs=rngs)

    def __call__(self, h: jax.Array, *, positions: jax.Array, mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        attn, cache = self.self_attn(self.input_layernorm(h), positions=positions, mask=mask, cache=cache)
        h = h + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return sharding.constrain(h, ("act_batch", "act_length", "act_embed")), cache


class Qwen2ForCausalLM(nnx.Module):
    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        c = self.config = config
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                      embedding_init=_INIT, embedding_metadata={"out_sharding": ("vocab", "embed")},
                                      rngs=rngs)
        self.layers = scan.stack(lambda r: Qwen2DecoderLayer(c, rngs=r), c.num_layers, rngs)
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = _linear(c, c.hidden_size, c.vocab_size, ("embed", "vocab"), bias=False, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token ids (B, T) -> hidden states (B, T, hidden) in the compute dtype."""
        h = self.embed_tokens(input_ids).astype(self.config.dtype)
        return sharding.constrain(h, ("act_batch", "act_length", "act_embed"))

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and output head (tied embedding or lm_head); fp32 logits (B, T, vocab)."""
        dtype = self.config.dtype
        h = self.norm(h).astype(dtype)
        if self.config.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", h, self.embed_tokens.embedding[...].astype(dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("btd,dv->btv", h, self.lm_head.kernel[...].astype(dtype),
                                preferred_element_type=jnp.float32)
        return sharding.constrain(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))

    def decode(self, h: jax.Array, *, positions: jax.Array, mask: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Runs the stacked decoder layers (one scan); `cache` must already carry this chunk's `valid` slots."""
        def body(layer, h, kv):
            layer_cache = None if kv is None else dataclasses.replace(cache, k=kv[0], v=kv[1])
            h, layer_cache = layer(h, positions=positions, mask=mask, cache=layer_cache)
            return h, None if layer_cache is None else (layer_cache.k, layer_cache.v)

        xs = None if cache is None else (cache.k, cache.v)
        h, kv = scan.scan(self.layers, body, h, xs, remat_policy=self.config.remat_policy,
                          unroll=self.config.scan_unroll)
        if cache is not None:
            cache = dataclasses.replace(cache, k=kv[0], v=kv[1], index=cache.index + h.shape[1])
        return h, cache

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 positions: jax.Array | None = None, cache: KVCache | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """input_ids (B, T) -> (fp32 logits (B, T, vocab), updated cache or None).

        `attention_mask` (B, T) marks real tokens (1) and left padding (0). With a cache the T tokens are written
        at slots [cache.index, cache.index + T); pass the same-width mask of just these tokens (ones when decoding).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        derived_positions, mask, key_valid = attention_inputs(attention_mask, cache)
        positions = derived_positions if positions is None else positions
        if cache is not None:
            cache = dataclasses.replace(cache, valid=key_valid)
        h, cache = self.decode(self.embed(input_ids), positions=positions, mask=mask, cache=cache)
        return self.logits(h), cache
