"""HTSAT's output tokens standardised per channel from the training data, for runs that start from a random HTSAT.

A random HTSAT passes the log-mel on almost linearly, so every token is the silent token plus a small deviation: on
the tiny curriculum a channel's spread over tokens is 0.27 against a mean of magnitude 0.78, and a beep barely moves
the audio transformer's input. AF-CLAP's pretraining makes events stand out. Setting HTSAT's final LayerNorm so
that the tokens of the run's first batches have mean 0 and one standard deviation per channel (`target_std`) gives
a random encoder that contrast and keeps every linear feature (pitch, time). It stays inside AF2's architecture, so
exports are unaffected: (LN(x) * scale + bias - mean) * g = LN(x) * (scale * g) + (bias - mean) * g, g = target / sd.

Frozen weights are not checkpointed (they come from `init_from` on every start), so the calibrated values are
saved beside the checkpoints and a resumed run reads them back instead of measuring again.
"""
from __future__ import annotations

import os
import pathlib
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.audio.mel import log_mel
from af2_jax.training.input_norm import masked_moments, summed_moments

NORM = ("htsat", "norm")
NORM_SCALE = "/".join(NORM + ("scale",))  # its path in init_from arrays
FILE = "htsat_feature_norm.npz"
EPS = 1e-6


@nnx.jit
def _batch_moments(model, audio: jax.Array, audio_mask: jax.Array):
    tokens = model.htsat(log_mel(audio.astype(jnp.float32)), train=False)  # (B, W, tokens, C), eval mode
    return masked_moments(tokens.astype(jnp.float32), audio_mask)


def token_moments(model: nnx.Module, batches: Iterable[dict]) -> np.ndarray:
    """(3, channels) float64: per-channel sum, sum of squares and count of the HTSAT tokens of every real window."""
    return summed_moments(batches, lambda audio, mask: _batch_moments(model, jnp.asarray(audio), jnp.asarray(mask)))


def standardised_norm(scale: np.ndarray, bias: np.ndarray, moments: np.ndarray | None, target_std: float = 1.0
                      ) -> dict[str, np.ndarray]:
    """The final LayerNorm's {'scale', 'bias'} whose output has per-channel mean 0 and standard deviation
    `target_std` over the tokens that `moments` measured with `scale` and `bias`."""
    if moments is None or moments[2, 0] < 2:
        raise ValueError("feature-norm calibration: the batches hold no audio window")
    if target_std <= 0:
        raise ValueError(f"feature-norm calibration: target_std must be > 0, got {target_std}")
    total, squares, count = moments
    mean = total / count
    gain = target_std / np.sqrt(np.maximum(squares / count - np.square(mean), 0.0) + EPS)
    return {"scale": np.asarray(scale, np.float64) * gain, "bias": (np.asarray(bias, np.float64) - mean) * gain}


def current_norm(model: nnx.Module) -> dict[str, np.ndarray]:
    norm = model.htsat.norm
    return {"scale": np.asarray(norm.scale.get_value()), "bias": np.asarray(norm.bias.get_value())}


def set_norm(tree: nnx.State, values: dict[str, np.ndarray]) -> bool:
    """Writes `values` into HTSAT's final LayerNorm in `tree` (an nnx.State that may not hold it; same dtype and
    sharding); True when it did."""
    node = tree
    for key in NORM:
        if key not in node:
            return False
        node = node[key]
    for name, value in values.items():
        old = node[name].get_value()
        node[name] = node[name].replace(jax.device_put(jnp.asarray(value, old.dtype), old.sharding))
    return True


def save(directory: pathlib.Path, values: dict[str, np.ndarray]) -> None:
    """Written whole or not at all (a temporary file renamed), so a crash never leaves half a calibration."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (FILE + ".tmp.npz")
    np.savez(tmp, **values)
    os.replace(tmp, directory / FILE)


def load(directory: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(directory / FILE, allow_pickle=False) as data:
        return {name: data[name] for name in ("scale", "bias")}


def as_params(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The calibrated values under their flat parameter paths (as `init_from` arrays)."""
    return {"/".join(NORM + (name,)): value for name, value in values.items()}
