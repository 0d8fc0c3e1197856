"""Softmax attention as HTSAT, T5, the audio transformer and the cross-attention all compute it, in one place.

Layout (..., T, H, D) for queries and (..., S, H, D) for keys and values, queries already scaled (T5 does not
scale). Logits are fp32; the additive biases are added in the order given (the references' order, so results stay
bit-equal); keys a query may not see get `masked_logit` (the references differ: masked_fill -1e9 in the audio
transformer, -FLT_MAX in the cross-attention, where a row with no visible key then gets a uniform softmax instead
of NaN); the softmax is fp32, dropout applies to the probabilities, and the weighted sum runs in `dtype`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from af2_jax.models.layers import dropout


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """q (..., T, H, D), k (..., S, H, D) -> (..., H, T, S) fp32."""
    return jnp.einsum("...thd,...shd->...hts", q, k, preferred_element_type=jnp.float32)


def attention_probs(q: jax.Array, k: jax.Array, *, biases: Sequence[jax.Array] = (), allowed: jax.Array | None = None,
                    masked_logit: float = -1e9) -> jax.Array:
    """Softmax over keys (..., H, T, S) fp32. `biases` broadcast to the logits and are added in order; `allowed`
    (boolean, broadcastable to the logits) keeps a logit, else it becomes `masked_logit`."""
    logits = attention_logits(q, k)
    for bias in biases:
        logits = logits + bias
    if allowed is not None:
        logits = jnp.where(allowed, logits, jnp.float32(masked_logit))
    return jax.nn.softmax(logits, axis=-1)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, dtype: Any, biases: Sequence[jax.Array] = (),
                      allowed: jax.Array | None = None, masked_logit: float = -1e9, dropout_rate: float = 0.0,
                      dropout_key: jax.Array | None = None) -> jax.Array:
    """(..., T, H, D) attention output in `dtype`; see `attention_probs` for the masks, `dropout_key` None: none."""
    probs = attention_probs(q, k, biases=biases, allowed=allowed, masked_logit=masked_logit)
    probs = dropout(probs, dropout_rate, dropout_key).astype(dtype)
    return jnp.einsum("...hts,...shd->...thd", probs, v)
