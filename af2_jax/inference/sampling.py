"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p (nucleus).

The filters follow Hugging Face's logits warpers in their order (temperature, then top-k, then top-p), so that the
reference's `generate(do_sample=True, top_k=30, top_p=0.95)` and ours pick from the same candidate set.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Scaled logits (..., V) in fp32 with every token outside the top-k / top-p set at -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        # Drop the low-probability tail whose total mass is <= 1 - top_p; the most likely token always stays.
        order = jnp.argsort(logits, axis=-1)  # ascending
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop_sorted = cumulative <= 1.0 - top_p
        drop_sorted = drop_sorted.at[..., -1].set(False)
        drop = jnp.zeros_like(drop_sorted).at[
            tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def next_token(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """logits (B, V) -> token ids (B,) int32; `key` is ignored when greedy."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
