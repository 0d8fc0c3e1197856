"""AF2's gated cross-attention block (XATTN-Dense), placed before every LLM decoder layer.

    h <- h + tanh(attn_gate) * XAttn(h, audio)    XAttn = LN(h) -> q; audio -> [k | v]; softmax(q k^T / 8) v -> out
    h <- h + tanh(ff_gate)   * FF(h)                  FF = LN -> Linear(4 dim) -> GELU(erf) -> Linear(dim)

By default every text token attends to every valid audio token of its own sample (no causal or media-location
mask), as in NVIDIA's `inference_HF_pretrained` code. Optionally (`visible_slots`, several audios per prompt) the
media-location mask of Audio Flamingo 1 applies as well: the audio tokens are laid out slot-major in slots of
`slot_size` tokens, and text position t sees the slots k < visible_slots[t] = max(#<audio> tokens at or before t, 1)
(docs/MULTI_AUDIO.md). Gates start at 0, so a fresh block is the identity. The audio keys and values depend only on
the audio, so `audio_kv` computes them once per prompt and generation reuses them per step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax import sharding
from af2_jax.models import attention as attention_lib, scan
from af2_jax.models.layers import Dense, LayerNorm


@dataclasses.dataclass(frozen=True)
class XAttnConfig:
    dim: int  # LLM hidden size (queries, residual stream)
    dim_audio: int  # audio-transformer width (keys/values source)
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # jax.nn.dot_product_attention's: None lets XLA choose (cuDNN's fused kernel on GPU where it applies)
    attention_implementation: str | None = None

    def __post_init__(self):
        if self.attention_implementation not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_implementation must be None, 'xla' or 'cudnn', got "
                             f"{self.attention_implementation!r}")

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head


# The reference fills masked logits with -FLT_MAX (not -inf) and subtracts the row max: a row whose every allowed
# key is masked then gets a uniform softmax over ALL keys instead of NaN. AF1 trained with that; we keep it.
MASKED_LOGIT = -float(jnp.finfo(jnp.float32).max)


def visible_slots(input_ids: jax.Array, audio_token_id: int, seen: jax.Array | None = None) -> jax.Array:
    """(B, T) int32: how many audio slots each text position may see, max(c(t), 1) with c(t) the number of
    `<audio>` tokens at positions <= t (plus `seen` (B,), those of earlier chunks: the cached prompt). Text before
    the first `<audio>` sees the first audio, as in AF1; a row without any `<audio>` sees slot 0 (AF1 crashes)."""
    count = jnp.cumsum((input_ids == audio_token_id).astype(jnp.int32), axis=-1)
    if seen is not None:
        count = count + seen.astype(jnp.int32)[:, None]
    return jnp.maximum(count, 1)


def allowed_keys(media_mask: jax.Array, visible: jax.Array | None = None, slot_size: int | None = None
                 ) -> jax.Array:
    """Which keys a query may attend: (B, 1, S) from the key mask alone, or (B, T, S) with the media-location
    mask (key j lies in slot j // slot_size; query t sees the slots < visible[t])."""
    valid = media_mask.astype(bool)[:, None, :]
    if visible is None:
        return valid
    if slot_size is None or slot_size < 1:
        raise ValueError(f"allowed_keys: visible slots need a positive slot_size, got {slot_size}")
    key_slot = jnp.arange(media_mask.shape[-1], dtype=jnp.int32) // slot_size
    return valid & (key_slot[None, None, :] < visible[:, :, None])


def attention_probs(q: jax.Array, k: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax over keys (B, H, T, S) fp32 with disallowed logits at -FLT_MAX; `allowed` (B, T or 1, S)."""
    return attention_lib.attention_probs(q, k, allowed=allowed[:, None], masked_logit=MASKED_LOGIT)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, dtype,
              implementation: str | None = None) -> jax.Array:
    """The whole cross-attention math through `jax.nn.dot_product_attention` (cuDNN where it applies): scaled
    queries (B, T, H, D), keys/values (B, S, H, D), `allowed` (B, T or 1, S) -> (B, T, H, D) in `dtype`. Its XLA
    path is `attention_probs` @ v: fp32 logits and softmax, and a disallowed logit becomes a large negative number
    (-0.7 FLT_MAX instead of -FLT_MAX: the same probabilities, also the uniform row when nothing is visible)."""
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=1.0, implementation=implementation)


class GatedCrossAttentionBlock(nnx.Module):
    """One gated cross-attention block. Parameters (our layout, torch Linear weights transposed):

    attn_norm/{scale,bias} (dim,); to_q/kernel (dim, heads*dim_head); to_kv/kernel (dim_audio, 2, heads*dim_head)
    holding [k | v]; to_out/kernel (heads*dim_head, dim); ff_norm/{scale,bias} (dim,); ff_in/kernel (dim, ff_mult*dim);
    ff_out/kernel (ff_mult*dim, dim); attn_gate, ff_gate (1,).
    """

    def __init__(self, config: XAttnConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dense = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.attn_norm = LayerNorm(c.dim, eps=c.eps, param_dtype=c.param_dtype)
        self.to_q = Dense(c.dim, c.inner_dim, ("embed", "heads"), **dense)
        # k and v fused in one (dim_audio, 2, inner) tensor, the reference's single to_kv Linear
        self.to_kv = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (c.dim_audio, 2, c.inner_dim),
                                                                c.param_dtype), out_sharding=("audio_embed", None, "heads"))
        self.to_out = Dense(c.inner_dim, c.dim, ("heads", "embed"), **dense)
        self.ff_norm = LayerNorm(c.dim, eps=c.eps, param_dtype=c.param_dtype)
        self.ff_in = Dense(c.dim, c.ff_mult * c.dim, ("embed", "mlp"), **dense)
        self.ff_out = Dense(c.ff_mult * c.dim, c.dim, ("mlp", "embed"), **dense)
        # tanh(0) = 0: a fresh block leaves the LLM untouched.
        self.attn_gate = nnx.Param(jnp.zeros((1,), c.param_dtype), out_sharding=("norm",))
        self.ff_gate = nnx.Param(jnp.zeros((1,), c.param_dtype), out_sharding=("norm",))

    def audio_kv(self, media: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Audio tokens (B, S, dim_audio) -> keys, values (B, S, heads, dim_head); depend on the audio only."""
        c = self.config
        kv = jnp.einsum("bsa,akn->bskn", media.astype(c.dtype), self.to_kv[...].astype(c.dtype))
        kv = scan.tag(kv, "key_proj")  # keys and values: one fused projection
        kv = kv.reshape(*kv.shape[:3], c.heads, c.dim_head)  # heads are the outer factor of (h d)
        return kv[:, :, 0], kv[:, :, 1]

    def queries(self, h: jax.Array) -> jax.Array:
        """h (B, T, dim) -> scaled queries (B, T, heads, dim_head)."""
        c = self.config
        q = scan.tag(self.to_q(self.attn_norm(h)), "query_proj").reshape(*h.shape[:2], c.heads, c.dim_head)
        return q * jnp.asarray(c.dim_head ** -0.5, c.dtype)

    def attend(self, h: jax.Array, k: jax.Array, v: jax.Array, media_mask: jax.Array,
               visible: jax.Array | None = None, slot_size: int | None = None) -> jax.Array:
        """Cross-attention output before its gate: h (B, T, dim), k/v (B, S, heads, dim_head), media_mask (B, S);
        with `visible` (B, T) (see `visible_slots`) and `slot_size` the media-location mask applies too."""
        c = self.config
        out = attention(self.queries(h), k, v, allowed_keys(media_mask, visible, slot_size), c.dtype,
                        c.attention_implementation)
        return scan.tag(self.to_out(out.reshape(*h.shape[:2], c.inner_dim)), "out_proj")

    def feed_forward(self, h: jax.Array) -> jax.Array:
        """FF output before its gate."""
        x = jax.nn.gelu(scan.tag(self.ff_in(self.ff_norm(h)), "mlp_in"), approximate=False)
        x = sharding.constrain(x, ("act_batch", "act_length", "act_mlp"))
        return scan.tag(self.ff_out(x), "mlp_out")

    def __call__(self, h: jax.Array, audio_kv: tuple[jax.Array, jax.Array], media_mask: jax.Array,
                 visible: jax.Array | None = None, slot_size: int | None = None) -> jax.Array:
        """h (B, T, dim) with audio keys/values from `audio_kv` and their mask (B, S) -> h (B, T, dim); `visible`
        (B, T) and `slot_size` add the media-location mask (None: off, every valid audio token is visible)."""
        k, v = audio_kv
        gate_attn = jnp.tanh(self.attn_gate[...].astype(jnp.float32))
        gate_ff = jnp.tanh(self.ff_gate[...].astype(jnp.float32))
        attn_out = self.attend(h, k, v, media_mask, visible, slot_size)
        h = h + (gate_attn * attn_out.astype(jnp.float32)).astype(h.dtype)
        h = h + (gate_ff * self.feed_forward(h).astype(jnp.float32)).astype(h.dtype)
        return sharding.constrain(h, ("act_batch", "act_length", "act_embed"))
