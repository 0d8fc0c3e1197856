"""The small layers every model here builds from (one parameter style: `kernel` (in, out) / `bias` / `scale`, each
with logical axis names): torch-semantics LayerNorm, RMSNorm, a Dense, and dropout. Norm statistics are always
computed in fp32. (Qwen2 keeps flax's nnx.Linear, which names its parameters the same way but draws a key for its
bias, so that seeded initialisations stay what they were.)"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """torch.nn.LayerNorm over the last axis (biased variance), computed and returned in fp32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity without a key (deterministic) or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Parameters `scale` and `bias`; the output keeps the input's dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps).astype(x.dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias) in the compute dtype; kernel (in, out) with logical axes `axes`."""

    def __init__(self, din: int, dout: int, axes: tuple[str, str], *, use_bias: bool, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs, init: Callable | None = None):
        self.dtype = dtype
        init = init or nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (din, dout), param_dtype), out_sharding=axes)
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype), out_sharding=(axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        return y + self.bias[...].astype(self.dtype) if self.bias is not None else y


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in fp32, returned in the compute dtype."""

    def __init__(self, dim: int, *, eps: float, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)
