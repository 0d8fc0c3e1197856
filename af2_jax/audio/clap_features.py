"""AF-CLAP's audio front end: a 16 kHz waveform -> (mel_fusion (4, 1001, 64), longer), as the reference's
`get_audio_features(..., max_len=160000, data_truncating='fusion', data_filling='repeatpad')` after
`get_audio_embedding_from_filelist`'s int16 round trip (afclap_reference.md section 2):

  <= 10 s   repeat-pad: tile the clip floor(160000 / len) times, zero-pad to 160000 samples; 4 copies of its mel;
            longer = False
  > 10 s    the mel of the whole clip (T = len // 160 + 1 frames); 3 crops of 1001 frames starting in the front /
            middle / back third of the valid start range (np.array_split of 0..T-1001); channel 0 = the whole mel
            resized to (1001, 64) by torch's bilinear antialiased resize; longer = True. (When T is exactly 1001 the
            reference takes the short-clip layout: 4 copies, longer = False.)

The log-mel is af2_jax.audio.mel's (same torchaudio settings as AF2's front end); `log_mel_frames` extends it to
any length. The resize is numpy (a fixed matrix per size pair). Only numpy and JAX: no torch, librosa or soundfile.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from af2_jax.audio import mel as mel_lib

MAX_SAMPLES = mel_lib.WINDOW_SAMPLES  # 10 s at 16 kHz
CHUNK_FRAMES = mel_lib.NUM_FRAMES  # 1001
CHANNELS = 4  # mel_fusion: [global, front, middle, back]


def pcm16_to_float(samples: np.ndarray) -> np.ndarray:
    """16-bit PCM -> float32 k / 32768, what librosa.load returns for a 16 kHz PCM_16 file."""
    return (np.asarray(samples, np.int16).astype(np.float32) / np.float32(32768.0)).astype(np.float32)


def int16_round_trip(waveform: np.ndarray) -> np.ndarray:
    """The reference's float32 -> int16 -> float32 quantisation: clip to [-1, 1], x * 32767 truncated toward 0,
    then / 32767."""
    x = np.clip(np.asarray(waveform, np.float32), -1.0, 1.0)
    return ((x * np.float32(32767.0)).astype(np.int16) / np.float32(32767.0)).astype(np.float32)


def repeat_pad(waveform: np.ndarray, length: int = MAX_SAMPLES) -> np.ndarray:
    """Tile a clip of <= `length` samples floor(length / len) times, then zero-pad at the end to `length`."""
    x = np.asarray(waveform, np.float32)
    if not 0 < x.shape[0] <= length:
        raise ValueError(f"repeat_pad needs 1..{length} samples, got {x.shape[0]}")
    tiled = np.tile(x, int(length / x.shape[0]))
    return np.pad(tiled, (0, length - tiled.shape[0]))


def log_mel_frames(waveform: np.ndarray) -> np.ndarray:
    """(N,) float32 samples, any N > N_FFT / 2 -> (1 + N // 160, 64) float32 log-mel (dB): af2_jax.audio.mel's
    STFT and filterbank without its fixed 10 s length (centre frames, reflect padding)."""
    x = np.asarray(waveform, np.float32)
    if x.ndim != 1 or x.shape[0] <= mel_lib.N_FFT // 2:
        raise ValueError(f"log_mel_frames needs a 1-D waveform of more than {mel_lib.N_FFT // 2} samples, "
                         f"got shape {x.shape}")
    if x.shape[0] == mel_lib.WINDOW_SAMPLES:
        return np.asarray(mel_lib.log_mel(x))
    half = mel_lib.N_FFT // 2
    padded = jnp.pad(jnp.asarray(x), (half, half), mode="reflect")
    starts = np.arange(1 + x.shape[0] // mel_lib.HOP) * mel_lib.HOP
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(mel_lib.N_FFT) / mel_lib.N_FFT)).astype(np.float32)
    frames = padded[starts[:, None] + np.arange(mel_lib.N_FFT)[None, :]] * window
    spectrum = jnp.fft.rfft(frames, n=mel_lib.N_FFT, axis=-1)
    power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
    mel = jnp.matmul(power, mel_lib.mel_filterbank(), precision="highest")
    return np.asarray(10.0 * jnp.log10(jnp.maximum(mel, mel_lib.AMIN)))


# ---------------------------------------------------------------------------------------------------------------
# torch's bilinear antialiased resize (F.interpolate(mode='bilinear', antialias=True, align_corners=False))

@functools.lru_cache(maxsize=32)
def antialias_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 M with resized = M @ x along one axis. torch's antialiased (PIL-style) triangle
    filter: output i is centred at scale * (i + 0.5) with scale = in / out; when shrinking (scale > 1) the triangle
    is stretched to half-width `scale`, otherwise it is plain bilinear; the taps inside the input are renormalised
    to sum 1. Computed in float32 as torch does for float32 inputs, so the tap windows match."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    support = scale if scale >= 1 else np.float32(1.0)
    invscale = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        center = scale * np.float32(i + 0.5)
        lo = max(int(center - support + np.float32(0.5)), 0)
        hi = min(int(center + support + np.float32(0.5)), in_size)
        taps = np.arange(lo, hi)
        weights = np.maximum(0.0, 1.0 - np.abs((taps.astype(np.float32) - center + np.float32(0.5)) * invscale))
        total = weights.sum(dtype=np.float32)
        matrix[i, lo:hi] = weights / total if total != 0 else weights
    matrix.setflags(write=False)
    return matrix


def resize_bilinear_antialias(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes of `x` to `size` (torch/torchvision bilinear with antialias, float32 out)."""
    x = np.asarray(x, np.float32)
    if x.ndim < 2:
        raise ValueError(f"resize needs at least 2 axes, got shape {x.shape}")
    rows = antialias_bilinear_matrix(x.shape[-2], size[0]).astype(np.float64)
    cols = antialias_bilinear_matrix(x.shape[-1], size[1]).astype(np.float64)
    return (rows @ x.astype(np.float64) @ cols.T).astype(np.float32)  # float64 sums: below float32 rounding


# ---------------------------------------------------------------------------------------------------------------

def fusion_starts(total_frames: int, rng, chunk_frames: int = CHUNK_FRAMES) -> tuple[int, int, int]:
    """One random crop start from each third (front, middle, back) of 0..total_frames - chunk_frames, the reference's
    np.array_split + choice (an empty third falls back to start 0). `rng` is a np.random.Generator or a
    np.random.RandomState; a RandomState(seed) draws what the reference draws after np.random.seed(seed)."""
    if total_frames <= chunk_frames:
        raise ValueError(f"crops need more than {chunk_frames} frames, got {total_frames}")
    thirds = [t if len(t) else np.array([0]) for t in np.array_split(np.arange(total_frames - chunk_frames + 1), 3)]
    return tuple(int(rng.choice(t)) for t in thirds)


def _draw_unused_crop(rng, overflow: int) -> None:
    """The reference then draws the start of a 10 s waveform crop the fusion model never reads; drawing it too keeps
    a RandomState on the reference's stream for the next clip."""
    if isinstance(rng, np.random.RandomState):
        rng.randint(0, overflow + 1)
    else:
        rng.integers(0, overflow + 1)


def clap_audio_features(waveform: np.ndarray, *, rng=None, starts: tuple[int, int, int] | None = None,
                        quantize: bool = True) -> tuple[np.ndarray, bool]:
    """(N,) float 16 kHz mono waveform -> (mel_fusion (4, 1001, 64) float32, longer).

    `starts` fixes the three crop starts of a clip longer than 10 s; otherwise they are drawn from `rng`
    (np.random.Generator or RandomState; None: a fresh default_rng()). `quantize` applies the reference's int16 round
    trip first (get_audio_embedding_from_filelist does; its training data loader too)."""
    x = np.asarray(waveform, np.float32)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty 1-D waveform, got shape {x.shape}")
    if quantize:
        x = int16_round_trip(x)
    if x.shape[0] <= MAX_SAMPLES:
        mel = log_mel_frames(repeat_pad(x))
        return np.repeat(mel[None], CHANNELS, axis=0), False
    mel = log_mel_frames(x)
    total = mel.shape[0]
    rng = np.random.default_rng() if rng is None and starts is None else rng
    if total == CHUNK_FRAMES:  # 10 s < length < 10 s + one hop
        if rng is not None:
            _draw_unused_crop(rng, x.shape[0] - MAX_SAMPLES)
        return np.repeat(mel[None], CHANNELS, axis=0), False
    if starts is None:
        starts = fusion_starts(total, rng)
        _draw_unused_crop(rng, x.shape[0] - MAX_SAMPLES)
    if len(starts) != 3 or not all(0 <= int(s) <= total - CHUNK_FRAMES for s in starts):
        raise ValueError(f"starts must be 3 crop starts in [0, {total - CHUNK_FRAMES}], got {starts}")
    crops = [mel[int(s):int(s) + CHUNK_FRAMES] for s in starts]
    shrunk = resize_bilinear_antialias(mel, (CHUNK_FRAMES, mel.shape[1]))
    return np.stack([shrunk, *crops]), True


def clap_audio_batch(waveforms, *, rng=None, quantize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Several clips -> (mel_fusion (B, 4, 1001, 64), longer (B,) bool), drawing crops from one `rng` in order."""
    rng = np.random.default_rng() if rng is None else rng
    features = [clap_audio_features(w, rng=rng, quantize=quantize) for w in waveforms]
    return np.stack([f[0] for f in features]), np.array([f[1] for f in features], bool)
