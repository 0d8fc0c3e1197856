"""HTSAT's two normalisations set from data, for an encoder that AF-CLAP did not pretrain. Both act on an `HTSAT`
in place, from batches of waveform windows (dicts with 'audio' (B, W, 160000) and 'audio_mask' (B, W)); training
calls them once before step 0 of a fresh run (`model.calibrate_input_norm`, `model.calibrate_feature_norm`), the
ICL demo on its random initial model.

`calibrate_input_norm`: bn0's running statistics become the per-mel-bin mean and unbiased variance of the log-mel of
every real window. AF-CLAP's bn0 holds those of its pretraining data, so the Swin layers read inputs of unit scale;
a random bn0 (mean 0, variance 1) leaves a log-mel of -100 to +40 dB near -100.

`standardise_output_norm`: the final LayerNorm's scale and bias are set so that the tokens of the batches have mean
0 and standard deviation `target_std` per channel. A random HTSAT passes the log-mel on almost linearly, so every
token is the silent token plus a small deviation (on the tiny curriculum a channel's spread over tokens is 0.27
against a mean of magnitude 0.78); AF-CLAP's pretraining makes events stand out. It stays inside the architecture:
(LN(x) * scale + bias - mean) * g = LN(x) * (scale * g) + (bias - mean) * g, g = target / sd.

`combine` sums the (3, C) moments over processes when each reads its own rows (default: these batches only).
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.audio.mel import log_mel

BN0_MEAN = "htsat/bn0/mean"  # the paths of the calibrated values in a model holding an `htsat`
NORM = ("htsat/norm/scale", "htsat/norm/bias")
EPS = 1e-6

Moments = np.ndarray  # (3, C) float64: per-channel sum, sum of squares, count
Combine = Callable[[Moments], Moments]


def masked_moments(values: jax.Array, audio_mask: jax.Array):
    """Sum, sum of squares and count per channel (last axis) of `values` (B, W, N, C) over the real windows
    (`audio_mask` (B, W) nonzero)."""
    weight = audio_mask[..., None, None].astype(jnp.float32)
    count = jnp.sum(weight) * values.shape[-2]
    return jnp.sum(values * weight, (0, 1, 2)), jnp.sum(jnp.square(values) * weight, (0, 1, 2)), count


def _summed_moments(batches: Iterable[dict], batch_moments: Callable, combine: Combine | None) -> Moments | None:
    moments = None
    for batch in batches:
        s, q, n = (np.asarray(x, np.float64) for x in batch_moments(jnp.asarray(batch["audio"]),
                                                                      jnp.asarray(batch["audio_mask"])))
        m = np.stack([s, q, np.full_like(s, n)])
        moments = m if moments is None else moments + m
    return combine(moments) if combine is not None and moments is not None else moments


def _mean_and_variance(moments: Moments | None, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel mean, biased variance and count."""
    if moments is None or moments[2, 0] < 2:
        raise ValueError(f"{what} calibration: the batches hold no audio window")
    total, squares, count = moments
    mean = total / count
    return mean, np.maximum(squares / count - np.square(mean), 0.0), count


@jax.jit
def _log_mel_moments(audio: jax.Array, audio_mask: jax.Array):
    return masked_moments(log_mel(audio), audio_mask)  # log-mel (B, W, frames, bins)


@nnx.jit
def _token_moments(htsat, audio: jax.Array, audio_mask: jax.Array):
    tokens = htsat(log_mel(audio.astype(jnp.float32)), train=False)  # (B, W, tokens, C), eval mode
    return masked_moments(tokens.astype(jnp.float32), audio_mask)


def log_mel_moments(batches: Iterable[dict], combine: Combine | None = None) -> Moments | None:
    """Per-bin moments of the log-mel of every real window; None for no batch."""
    return _summed_moments(batches, _log_mel_moments, combine)


def token_moments(htsat: nnx.Module, batches: Iterable[dict], combine: Combine | None = None) -> Moments | None:
    """Per-channel moments of HTSAT's output tokens (eval mode) of every real window; None for no batch."""
    return _summed_moments(batches, lambda audio, mask: _token_moments(htsat, audio, mask), combine)


def input_statistics(moments: Moments | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and unbiased variance from `log_mel_moments`."""
    mean, variance, count = _mean_and_variance(moments, "input-norm")
    return mean, variance * count / (count - 1)


def standardised_norm(scale: np.ndarray, bias: np.ndarray, moments: Moments | None, target_std: float = 1.0
                      ) -> dict[str, np.ndarray]:
    """The final LayerNorm's {'scale', 'bias'} whose output has per-channel mean 0 and standard deviation
    `target_std` over the tokens that `moments` measured with `scale` and `bias`."""
    mean, variance, _ = _mean_and_variance(moments, "feature-norm")
    if target_std <= 0:
        raise ValueError(f"feature-norm calibration: target_std must be > 0, got {target_std}")
    gain = target_std / np.sqrt(variance + EPS)
    return {"scale": np.asarray(scale, np.float64) * gain, "bias": (np.asarray(bias, np.float64) - mean) * gain}


def _assign(variable: nnx.Variable, value: np.ndarray) -> None:
    """In place, keeping the variable's dtype and sharding."""
    old = variable.get_value()
    if old.shape != np.shape(value):
        raise ValueError(f"calibration: the model holds {old.shape}, the calibrated values {np.shape(value)}")
    variable.value = jax.device_put(jnp.asarray(value, old.dtype), old.sharding)


def set_input_norm(htsat: nnx.Module, mean: np.ndarray, var: np.ndarray) -> None:
    _assign(htsat.bn0.mean, mean)
    _assign(htsat.bn0.var, var)


def set_output_norm(htsat: nnx.Module, values: dict[str, np.ndarray]) -> None:
    _assign(htsat.norm.scale, values["scale"])
    _assign(htsat.norm.bias, values["bias"])


def calibrate_input_norm(htsat: nnx.Module, batches: Iterable[dict], combine: Combine | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Sets bn0's running mean and variance from `batches`; returns them."""
    mean, var = input_statistics(log_mel_moments(batches, combine))
    set_input_norm(htsat, mean, var)
    return mean, var


def standardise_output_norm(htsat: nnx.Module, batches: Iterable[dict], target_std: float,
                            combine: Combine | None = None) -> dict[str, np.ndarray]:
    """Sets the final LayerNorm so that the tokens of `batches` are standardised to `target_std`; returns its
    {'scale', 'bias'}."""
    current = {"scale": np.asarray(htsat.norm.scale.get_value()), "bias": np.asarray(htsat.norm.bias.get_value())}
    values = standardised_norm(**current, moments=token_moments(htsat, batches, combine), target_std=target_std)
    set_output_norm(htsat, values)
    return values
