"""Layers with torch's semantics where flax's own differ: truncated-normal init in absolute bounds, a
non-overlapping Conv2d as one matmul, and BatchNorm with torch's running-statistics update."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.models.variables import Buffer


def trunc_normal(std: float):
    """torch's trunc_normal_(std=std) (bounds -2, 2 absolute, as timm calls it)."""
    return nnx.initializers.truncated_normal(stddev=std, lower=-2.0 / std, upper=2.0 / std)


class Conv2d(nnx.Module):
    """Non-overlapping (stride = kernel) 2-D convolution on channels-last maps, kernel (kh, kw, in, out).

    A stride-equal-kernel convolution is a reshape into patches and one matmul: the same sums, and faster than a
    general convolution on every backend. Trailing rows/columns that do not fill a patch are dropped, as in torch.
    """

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], out_axis: str, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        fan_in = cin * kernel[0] * kernel[1]
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (*kernel, cin, cout), param_dtype) / np.sqrt(fan_in),
                                out_sharding=("conv", "conv", "conv", out_axis))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), out_sharding=(out_axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw, cin, cout = self.kernel.shape
        *lead, h, w, _ = x.shape
        gh, gw = h // kh, w // kw
        x = x[..., : gh * kh, : gw * kw, :].reshape(*lead, gh, kh, gw, kw, cin)
        x = jnp.moveaxis(x, -4, -3).reshape(*lead, gh, gw, kh * kw * cin)
        y = x.astype(self.dtype) @ self.kernel[...].reshape(kh * kw * cin, cout).astype(self.dtype)
        return y + self.bias[...].astype(self.dtype)


class BatchNorm(nnx.Module):
    """torch BatchNorm over the last (channel) axis: eval uses running statistics; training uses batch statistics
    and updates the running ones with the unbiased variance, as torch does (flax's BatchNorm differs in both)."""

    def __init__(self, channels: int, *, eps: float, momentum: float, param_dtype: Any):
        self.eps, self.momentum = eps, momentum
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), out_sharding=("norm",))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32), out_sharding=("norm",))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32), out_sharding=("norm",))
        # torch's counter; int32 here (jax without x64), int64 in torch files (the converter casts)
        self.num_batches_tracked = Buffer(jnp.zeros((), jnp.int32), out_sharding=())

    def _apply(self, x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        return (x.astype(jnp.float32) - mean) * inv + self.bias[...].astype(jnp.float32)

    def __call__(self, x: jax.Array, *, train: bool, call_axis: int | None = None, count_factor: int = 1) -> jax.Array:
        """Normalises x (fp32 out). In training, each index along `call_axis` is a separate reference call with its
        own batch statistics (reduced over every other non-channel axis); the running statistics are updated once
        per call, in order. `count_factor` scales the element count of the unbiased variance (duplicated inputs)."""
        if not train:
            return self._apply(x, self.mean[...], self.var[...])
        x32 = x.astype(jnp.float32)
        if call_axis is None:
            x32, call_axis = x32[None], 0
        x32 = jnp.moveaxis(x32, call_axis, 0)
        axes = tuple(range(1, x32.ndim - 1))
        mean = x32.mean(axes, keepdims=True)
        var = jnp.square(x32 - mean).mean(axes, keepdims=True)
        y = self._apply(x32, mean, var)
        count = count_factor * int(np.prod([x32.shape[a] for a in axes]))
        unbiased = var.reshape(x32.shape[0], -1) * (count / max(count - 1, 1))

        def update(running, stats):
            mean_r, var_r = running
            m, v = stats
            return ((1 - self.momentum) * mean_r + self.momentum * m, (1 - self.momentum) * var_r + self.momentum * v), None

        (new_mean, new_var), _ = jax.lax.scan(update, (self.mean[...], self.var[...]),
                                              (mean.reshape(x32.shape[0], -1), unbiased))
        self.mean.value, self.var.value = new_mean, new_var
        self.num_batches_tracked.value = self.num_batches_tracked[...] + x32.shape[0]
        y = jnp.moveaxis(y, 0, call_axis)
        return y[0] if x.ndim == y.ndim - 1 else y
