"""PyTorch-compatible bicubic resize along one axis (F.interpolate(mode='bicubic', align_corners=True)).

HTSAT stretches each 1001-frame log-mel to 1024 frames this way before folding it into a 256x256 image.
`jax.image.resize('cubic')` uses half-pixel centres and Keys' A = -0.5, so it does not reproduce the reference;
PyTorch uses A = -0.75, source position = dst * (in - 1) / (out - 1) and clamps the 4 taps to the border.

A 1-D resize is linear, so it is a fixed (out, in) matrix: built once per size pair in numpy and applied with one
einsum (exact, fast on every backend, differentiable). The 64 mel bins stay as they are (a 64 -> 64 align-corners
resize is the identity in PyTorch too).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _cubic_weights(t: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    """Keys cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t: (n, 4)."""

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


@functools.lru_cache(maxsize=32)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix M with resized = M @ x, matching PyTorch's align_corners=True bicubic."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    # Source positions as PyTorch computes them for float32 inputs: a float32 scale times the output index in float32,
    # so the floor and the fractional part land on the same side of every integer as in the reference.
    scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0.0)
    src = scale * np.arange(out_size, dtype=np.float32)
    base = np.clip(np.floor(src), 0, in_size - 1).astype(np.int64)
    t = np.clip(src.astype(np.float64) - base, 0.0, 1.0)
    weights = _cubic_weights(t)  # float64
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    for tap in range(4):  # taps beyond the border are clamped onto the edge sample (they accumulate there)
        cols = np.clip(base + tap - 1, 0, in_size - 1)
        np.add.at(matrix, (rows, cols), weights[:, tap])
    matrix.setflags(write=False)
    return matrix.astype(np.float32)


def bicubic_resize_axis(x: jax.Array, out_size: int, axis: int) -> jax.Array:
    """Resizes `x` along `axis` to `out_size` samples (torch bicubic, align_corners=True); other axes untouched."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"bicubic resize needs a floating-point array, got {x.dtype}")
    axis = axis % x.ndim
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    matrix = jnp.asarray(bicubic_matrix(in_size, out_size), dtype=x.dtype)
    moved = jnp.moveaxis(x, axis, -1)
    # HIGHEST: a resize is a handful of taps; TF32/bf16 passes on accelerators would cost accuracy for no speed.
    out = jnp.einsum("...i,oi->...o", moved, matrix, precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(out, -1, axis)
