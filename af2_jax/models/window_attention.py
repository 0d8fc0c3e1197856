"""Swin window attention as HTSAT runs it: tokens of a square grid attend within non-overlapping windows, with a
learned relative-position bias and, for the shifted blocks, a 0/-100 mask between regions the cyclic shift brought
together. The relative-position index and the shift masks are structural constants computed here (also what the
converter writes for the reference's buffers). On CPU the windows are processed in cache-sized groups under a
custom backward pass (see `_attend_in_groups`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.models import scan
from af2_jax.models.attention import softmax_attention
from af2_jax.models.htsat_config import HTSATConfig
from af2_jax.models.layers import Dense
from af2_jax.models.torch_layers import trunc_normal


def relative_position_index(window: int) -> np.ndarray:
    """(window^2, window^2) int64 index into the (2 window - 1)^2 relative position bias table."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype(np.int64)


def partition_windows(x: np.ndarray | jax.Array, window: int):
    """(..., H, W, C) -> (..., nW, window^2, C), windows in raster order."""
    *lead, h, w, c = x.shape
    x = x.reshape(*lead, h // window, window, w // window, window, c)
    x = jnp.moveaxis(x, -4, -3) if isinstance(x, jax.Array) else np.moveaxis(x, -4, -3)
    return x.reshape(*lead, (h // window) * (w // window), window * window, c)


def merge_windows(x: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """Inverse of `partition_windows`."""
    *lead, _, _, c = x.shape
    x = x.reshape(*lead, h // window, w // window, window, window, c)
    return jnp.moveaxis(x, -3, -4).reshape(*lead, h, w, c)


def shift_attention_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """(nW, window^2, window^2) float32 mask of the shifted windows: 0 within a region, -100 across regions."""
    labels = np.zeros((resolution, resolution, 1), np.float32)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for hs in bounds:
        for ws in bounds:
            labels[hs, ws] = count
            count += 1
    windows = partition_windows(labels, window)[..., 0]  # (nW, window^2)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, np.float32(-100.0), np.float32(0.0)).astype(np.float32)


class WindowAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, window: int, config: HTSATConfig, *, rngs: nnx.Rngs):
        c = config
        self.config, self.heads, self.dtype = c, heads, c.dtype
        self.qkv = Dense(dim, 3 * dim, ("audio_embed", "audio_heads"), use_bias=c.qkv_bias, dtype=c.dtype,
                         param_dtype=c.param_dtype, rngs=rngs, init=trunc_normal(0.02))
        self.proj = Dense(dim, dim, ("audio_heads", "audio_embed"), use_bias=True, dtype=c.dtype,
                          param_dtype=c.param_dtype, rngs=rngs, init=trunc_normal(0.02))
        self.relative_position_bias_table = nnx.Param(
            trunc_normal(0.02)(rngs.params(), ((2 * window - 1) ** 2, heads), c.param_dtype),
            out_sharding=("bias_table", "audio_heads"))

    def __call__(self, x: jax.Array, index: np.ndarray, mask: np.ndarray | None) -> jax.Array:
        """x (N, nW, L, C) windows of L tokens; `mask` (nW, L, L) or None -> (N, nW, L, C)."""
        *lead, length, dim = x.shape
        head_dim = dim // self.heads
        qkv = scan.tag(self.qkv(x), "qkv_proj").reshape(*lead, length, 3, self.heads, head_dim)  # torch order: (3, heads, head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        bias = self.relative_position_bias_table[...].astype(jnp.float32)[index.reshape(-1)]
        bias = bias.reshape(length, length, self.heads).transpose(2, 0, 1)
        mask = None if mask is None else jnp.asarray(mask)
        windows = x.shape[-3]
        chunk = _attention_chunk(windows, int(np.prod(lead)) // windows * self.heads * length * length,
                                 self.config.attention_chunk_scores)
        if chunk == windows:
            out = _attend(q, k, v, bias, mask, self.dtype)
        else:
            out = _attend_in_groups(q, k, v, bias, mask, chunk, self.dtype)
        return scan.tag(self.proj(out.reshape(*lead, length, dim)), "out_proj")


def _attend(q, k, v, bias, mask, dtype):
    """Softmax attention within windows: q, k, v (..., w, L, heads, head_dim), bias (heads, L, L), mask (w, L, L)
    or None -> (..., w, L, heads, head_dim)."""
    biases = (bias,) if mask is None else (bias, mask[:, None])  # (w, 1, L, L) against (..., w, heads, L, L)
    return softmax_attention(q, k, v, dtype=dtype, biases=biases)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend_in_groups(q, k, v, bias, mask, chunk, dtype):
    """`_attend` as a loop over groups of `chunk` windows (axis -4 of q, k, v). The backward pass is `_attend`'s,
    unlooped: the loop's own transpose puts cross-device gradient sums inside a while loop, where XLA:CPU's
    concurrent thunk executor deadlocked two host devices (stage 2, session 7)."""
    windows = q.shape[-4]

    def group(a):  # (..., windows, L, h, d) -> (windows // chunk, ..., chunk, L, h, d)
        return jnp.moveaxis(a.reshape(*a.shape[:-4], windows // chunk, chunk, *a.shape[-3:]), -5, 0)

    masks = None if mask is None else mask.reshape(-1, chunk, *mask.shape[1:])
    out = jax.lax.map(lambda xs: _attend(*xs[:3], bias, xs[3], dtype), (group(q), group(k), group(v), masks))
    return jnp.moveaxis(out, 0, -5).reshape(q.shape)


def _attend_in_groups_forward(q, k, v, bias, mask, chunk, dtype):
    return _attend_in_groups(q, k, v, bias, mask, chunk, dtype), (q, k, v, bias, mask)


def _attend_in_groups_backward(chunk, dtype, residuals, grad):
    return jax.vjp(lambda *args: _attend(*args, dtype), *residuals)[1](grad)


_attend_in_groups.defvjp(_attend_in_groups_forward, _attend_in_groups_backward)


def _attention_chunk(windows: int, scores_per_window: int, budget: int | None) -> int:
    """The largest divisor of `windows` whose scores fit `budget` (at least 1); all of them when budget is 0;
    None is 2**18 on the CPU backend and 0 elsewhere."""
    if budget is None:
        budget = 2 ** 18 if jax.default_backend() == "cpu" else 0
    if budget <= 0:
        return windows
    fitting = max(1, budget // max(1, scores_per_window))
    return max(d for d in range(1, windows + 1) if windows % d == 0 and d <= fitting)
