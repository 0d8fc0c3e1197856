"""AF2's gated cross-attention block (XATTN-Dense), placed before every LLM decoder layer.

    h <- h + tanh(attn_gate) * XAttn(h, audio)    XAttn = LN(h) -> q; audio -> [k | v]; softmax(q k^T / 8) v -> out
    h <- h + tanh(ff_gate)   * FF(h)                  FF = LN -> Linear(4 dim) -> GELU(erf) -> Linear(dim)

Every text token attends to every valid audio token of its own sample (no causal or media-location mask), as in
NVIDIA's `inference_HF_pretrained` code. Gates start at 0, so a fresh block is the identity. The audio keys and
values depend only on the audio, so `audio_kv` computes them once per prompt and generation reuses them per step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax import sharding
from af2_jax.models.layers import layer_norm


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

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head


def _param(init, key, shape, param_dtype, axes) -> nnx.Param:
    return nnx.Param(init(key, shape, param_dtype), out_sharding=axes)


class GatedCrossAttentionBlock(nnx.Module):
    """One gated cross-attention block. Parameters (our layout, torch Linear weights transposed):

    attn_norm/{scale,bias} (dim,); to_q/kernel (dim, heads*dim_head); to_kv/kernel (dim_audio, 2, heads*dim_head)
    holding [k | v]; to_out/kernel (heads*dim_head, dim); ff_norm/{scale,bias} (dim,); ff_in/kernel (dim, ff_mult*dim);
    ff_out/kernel (ff_mult*dim, dim); attn_gate, ff_gate (1,).
    """

    def __init__(self, config: XAttnConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dense = nnx.initializers.lecun_normal()
        ones, zeros = nnx.initializers.ones, nnx.initializers.zeros
        self.attn_norm_scale = _param(ones, None, (c.dim,), c.param_dtype, ("norm",))
        self.attn_norm_bias = _param(zeros, None, (c.dim,), c.param_dtype, ("norm",))
        self.to_q = nnx.Param(dense(rngs.params(), (c.dim, c.inner_dim), c.param_dtype),
                              out_sharding=("embed", "heads"))
        self.to_kv = nnx.Param(dense(rngs.params(), (c.dim_audio, 2, c.inner_dim), c.param_dtype),
                               out_sharding=("audio_embed", None, "heads"))
        self.to_out = nnx.Param(dense(rngs.params(), (c.inner_dim, c.dim), c.param_dtype),
                                out_sharding=("heads", "embed"))
        self.ff_norm_scale = _param(ones, None, (c.dim,), c.param_dtype, ("norm",))
        self.ff_norm_bias = _param(zeros, None, (c.dim,), c.param_dtype, ("norm",))
        hidden = c.ff_mult * c.dim
        self.ff_in = nnx.Param(dense(rngs.params(), (c.dim, hidden), c.param_dtype), out_sharding=("embed", "mlp"))
        self.ff_out = nnx.Param(dense(rngs.params(), (hidden, c.dim), c.param_dtype), out_sharding=("mlp", "embed"))
        # tanh(0) = 0: a fresh block leaves the LLM untouched.
        self.attn_gate = _param(zeros, None, (1,), c.param_dtype, ("norm",))
        self.ff_gate = _param(zeros, None, (1,), c.param_dtype, ("norm",))

    def audio_kv(self, media: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Audio tokens (B, S, dim_audio) -> keys, values (B, S, heads, dim_head); depend on the audio only."""
        c = self.config
        kv = jnp.einsum("bsa,akn->bskn", media.astype(c.dtype), self.to_kv[...].astype(c.dtype))
        kv = kv.reshape(*kv.shape[:3], c.heads, c.dim_head)  # heads are the outer factor of (h d)
        return kv[:, :, 0], kv[:, :, 1]

    def attend(self, h: jax.Array, k: jax.Array, v: jax.Array, media_mask: jax.Array) -> jax.Array:
        """Cross-attention output before its gate: h (B, T, dim), k/v (B, S, heads, dim_head), media_mask (B, S)."""
        c = self.config
        x = layer_norm(h, self.attn_norm_scale[...], self.attn_norm_bias[...], c.eps).astype(c.dtype)
        q = (x @ self.to_q[...].astype(c.dtype)).reshape(*x.shape[:2], c.heads, c.dim_head)
        q = q * jnp.asarray(c.dim_head ** -0.5, c.dtype)
        sim = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        # The reference fills masked keys with -FLT_MAX and subtracts the row max, so a sample without any valid
        # audio attends uniformly to all audio tokens (rather than producing NaN); jnp.where + softmax does the same.
        valid = media_mask.astype(bool)[:, None, None, :]
        sim = jnp.where(valid, sim, -jnp.finfo(jnp.float32).max)
        attn = jax.nn.softmax(sim, axis=-1).astype(c.dtype)
        out = jnp.einsum("bhts,bshd->bthd", attn, v).reshape(*h.shape[:2], c.inner_dim)
        return out @ self.to_out[...].astype(c.dtype)

    def feed_forward(self, h: jax.Array) -> jax.Array:
        """FF output before its gate."""
        c = self.config
        x = layer_norm(h, self.ff_norm_scale[...], self.ff_norm_bias[...], c.eps).astype(c.dtype)
        x = jax.nn.gelu(x @ self.ff_in[...].astype(c.dtype), approximate=False)
        x = sharding.constrain(x, ("act_batch", "act_length", "act_mlp"))
        return x @ self.ff_out[...].astype(c.dtype)

    def __call__(self, h: jax.Array, audio_kv: tuple[jax.Array, jax.Array], media_mask: jax.Array) -> jax.Array:
        """h (B, T, dim) with audio keys/values from `audio_kv` and their mask (B, S) -> h (B, T, dim)."""
        k, v = audio_kv
        gate_attn = jnp.tanh(self.attn_gate[...].astype(jnp.float32))
        gate_ff = jnp.tanh(self.ff_gate[...].astype(jnp.float32))
        h = h + (gate_attn * self.attend(h, k, v, media_mask).astype(jnp.float32)).astype(h.dtype)
        h = h + (gate_ff * self.feed_forward(h).astype(jnp.float32)).astype(h.dtype)
        return sharding.constrain(h, ("act_batch", "act_length", "act_embed"))
