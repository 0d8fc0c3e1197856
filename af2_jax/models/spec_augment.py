"""SpecAugment as torchlibrosa draws it (HTSAT's training-mode input augmentation)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def spec_augment(x: jax.Array, key: jax.Array, time: tuple[int, int], freq: tuple[int, int]) -> jax.Array:
    """torchlibrosa SpecAugmentation on (N, T, F): per sample, `stripes` times zero a band of width
    randint(0, width) starting at randint(0, size - width_drawn); first along time, then along frequency."""
    n, t_size, f_size = x.shape

    def stripes_mask(key, size, width, count):
        k_width, k_start = jax.random.split(key)
        widths = jax.random.randint(k_width, (n, count), 0, width)
        starts = jax.random.randint(k_start, (n, count), 0, size - widths)
        pos = jnp.arange(size)[None, None, :]
        dropped = (pos >= starts[..., None]) & (pos < (starts + widths)[..., None])
        return dropped.any(1)  # (N, size)

    k_time, k_freq = jax.random.split(key)
    drop_t = stripes_mask(k_time, t_size, *time)
    drop_f = stripes_mask(k_freq, f_size, *freq)
    dropped = drop_t[:, :, None] | drop_f[:, None, :]
    return jnp.where(dropped, jnp.zeros((), x.dtype), x)
