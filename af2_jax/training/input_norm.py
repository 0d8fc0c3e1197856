"""HTSAT's input normalisation (bn0) set from the training data, for runs that start from a random HTSAT.

AF-CLAP's bn0 holds the per-mel-bin mean and variance of the log-mel its pretraining saw, so the Swin layers read
inputs of unit scale. A random HTSAT has mean 0 and variance 1 on a log-mel of -100 to +40 dB, so every input sits
near -100. Measuring the same statistics on the run's own first batches, once before step 0, gives the random encoder
what a pretrained one would have (on the tiny curriculum: counting learns, pitch no longer does; docs/RESULTS.md).
They are running statistics (batch_stats), so checkpoints and exports carry them.
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.audio.mel import log_mel

BN0 = ("htsat", "bn0")
BN0_MEAN = "/".join(BN0 + ("mean",))  # its path in init_from arrays


def masked_moments(values: jax.Array, audio_mask: jax.Array):
    """Sum, sum of squares and count per channel (last axis) of `values` (B, W, N, C) over the real windows
    (`audio_mask` (B, W) nonzero); traced inside each calibration's jitted function."""
    weight = audio_mask[..., None, None].astype(jnp.float32)
    count = jnp.sum(weight) * values.shape[-2]
    return jnp.sum(values * weight, (0, 1, 2)), jnp.sum(jnp.square(values) * weight, (0, 1, 2)), count


def summed_moments(batches: Iterable[dict], batch_moments: Callable) -> np.ndarray | None:
    """(3, C) float64: `batch_moments(audio, audio_mask)` (a `masked_moments` triple) added over `batches` (dicts
    with 'audio' (B, W, 160000) and 'audio_mask' (B, W)); None for no batch. Moments add across processes."""
    moments = None
    for batch in batches:
        s, q, n = (np.asarray(x, np.float64) for x in batch_moments(batch["audio"], batch["audio_mask"]))
        m = np.stack([s, q, np.full_like(s, n)])
        moments = m if moments is None else moments + m
    return moments


@jax.jit
def _window_moments(audio: jax.Array, audio_mask: jax.Array):
    return masked_moments(log_mel(audio), audio_mask)  # log-mel (B, W, frames, bins)


def log_mel_moments(batches: Iterable[dict]) -> np.ndarray:
    """(3, bins) float64: per-bin sum, sum of squares and frame count of the log-mel of every real window."""
    return summed_moments(batches, _window_moments)


def statistics(moments: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and unbiased variance from `log_mel_moments`."""
    if moments is None or moments[2, 0] < 2:
        raise ValueError("input-norm calibration: the batches hold no audio window")
    total, squares, count = moments
    mean = total / count
    return mean, np.maximum(squares / count - np.square(mean), 0.0) * count / (count - 1)


def set_input_norm(batch_stats: nnx.State, mean: np.ndarray, var: np.ndarray) -> nnx.State:
    """batch_stats with HTSAT bn0's running mean and variance replaced (same dtype and sharding)."""
    bn0 = batch_stats
    for key in BN0:
        bn0 = bn0[key]
    for name, value in (("mean", mean), ("var", var)):
        old = bn0[name].get_value()
        if old.shape != value.shape:
            raise ValueError(f"bn0 {name}: the model has {old.shape} bins, the statistics {value.shape}")
        bn0[name] = bn0[name].replace(jax.device_put(jnp.asarray(value, old.dtype), old.sharding))
    return batch_stats
