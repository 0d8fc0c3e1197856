"""Rotary position embeddings (NeoX "rotate-half" layout), shared by the Qwen2 decoder and the audio transformer.

The first `rotary_dim` dims of each head are split in two halves (x1, x2) and rotated as
(x1 cos - x2 sin, x2 cos + x1 sin) with angles position * inv_freq, the frequencies repeated over both halves;
the remaining dims pass through unchanged (AF2's audio transformer rotates 128 of 256 dims). All angle math is fp32
whatever the activation dtype, as in the PyTorch references.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inv_freq(rotary_dim: int, base: float) -> np.ndarray:
    """base^(-2i/rotary_dim) for i < rotary_dim/2, as fp32 (the same op order as transformers' default RoPE)."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    return (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    """(x1, x2) -> (-x2, x1) over the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def cos_sin(positions: jax.Array, frequencies: np.ndarray | jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the angles for integer `positions` (..., T) -> (..., T, rotary_dim), fp32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(frequencies, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, positions: jax.Array, *, base: float, rotary_dim: int | None = None) -> jax.Array:
    """Rotates the first `rotary_dim` dims (default: all) of each head of `x` (B, T, heads, head_dim).

    `positions` is (B, T) or (T,) of integer positions. Computed in fp32, returned in x's dtype.
    """
    head_dim = x.shape[-1]
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if rotary_dim > head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} exceeds head_dim {head_dim}")
    cos, sin = cos_sin(positions, inv_freq(rotary_dim, base))
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    x32 = x.astype(jnp.float32)
    rot, rest = x32[..., :rotary_dim], x32[..., rotary_dim:]
    rot = rot * cos + rotate_half(rot) * sin
    return jnp.concatenate([rot, rest], axis=-1).astype(x.dtype)
