"""Log-mel spectrogram of 10 s windows in JAX, matching the reference's torchaudio front end (CLAP.get_mel):
MelSpectrogram(16 kHz, n_fft 1024, hop 160, periodic Hann, center/reflect, power 2, 64 HTK mels 50-8000 Hz,
norm None) then AmplitudeToDB(top_db=None), transposed to (frames, mels).

The STFT is framing (one gather) + jnp.fft.rfft in float32: FFT error grows like log2(n_fft)*eps, where a DFT
matmul would need 1 GFLOP per window and precision HIGHEST to stay accurate on GPU/TPU. The filterbank is plain
numpy (no librosa), so the train step and `af2_jax.models` run without the data stack.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 160000
N_FFT = 1024
HOP = 160
N_MELS = 64
F_MIN = 50.0
F_MAX = 8000.0
NUM_FRAMES = 1 + WINDOW_SAMPLES // HOP  # 1001 with center padding
AMIN = 1e-10  # power floor: silence is exactly -100 dB


@functools.lru_cache(maxsize=None)
def mel_filterbank() -> np.ndarray:
    """(N_FFT // 2 + 1, N_MELS) float32 HTK mel filters without area normalisation (torchaudio's melscale_fbanks,
    librosa's htk=True norm=None): triangles between N_MELS + 2 points equally spaced in HTK mel, in float64."""
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    corners = 700.0 * (10.0 ** (np.linspace(to_mel(F_MIN), to_mel(F_MAX), N_MELS + 2) / 2595.0) - 1.0)
    bins = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    rising = (bins[:, None] - corners[None, :-2]) / np.diff(corners)[None, :-1]
    falling = (corners[None, 2:] - bins[:, None]) / np.diff(corners)[None, 1:]
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _hann_window() -> np.ndarray:
    """Periodic Hann of length N_FFT (torch.hann_window default), computed in float64."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def _frame_starts(num_samples: int) -> np.ndarray:
    return np.arange(1 + num_samples // HOP) * HOP


def log_mel(windows: jax.Array) -> jax.Array:
    """(..., 160000) float32 waveforms -> (..., 1001, 64) float32 log-mel in dB (10*log10(max(power, 1e-10)))."""
    windows = jnp.asarray(windows, jnp.float32)
    if windows.ndim < 1 or windows.shape[-1] != WINDOW_SAMPLES:
        raise ValueError(f"log_mel: expected (..., {WINDOW_SAMPLES}) samples, got shape {windows.shape}")
    half = N_FFT // 2
    padding = [(0, 0)] * (windows.ndim - 1) + [(half, half)]
    padded = jnp.pad(windows, padding, mode="reflect")  # torch 'reflect': the edge sample is not repeated
    indices = _frame_starts(WINDOW_SAMPLES)[:, None] + np.arange(N_FFT)[None, :]  # (1001, 1024)
    frames = padded[..., indices] * _hann_window()
    spectrum = jnp.fft.rfft(frames, n=N_FFT, axis=-1)  # (..., 1001, 513) complex64
    power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
    mel = jnp.matmul(power, mel_filterbank(), precision=jax.lax.Precision.HIGHEST)
    return 10.0 * jnp.log10(jnp.maximum(mel, AMIN))
