"""Cutting a prepared waveform into AF2's 10 s windows, and batching them (reference `get_num_windows`,
`load_audio` and `DataCollator` semantics). Numpy only."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 160000  # 10 s, no overlap


def num_windows(num_samples: int, max_windows: int) -> int:
    """Reference formula: <= 1 window length -> 1; >= max_windows lengths -> max_windows; else 1 + ceil(rest)."""
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if num_samples <= WINDOW_SAMPLES:
        return 1
    if num_samples >= max_windows * WINDOW_SAMPLES:
        return max_windows
    return 1 + math.ceil((num_samples - WINDOW_SAMPLES) / WINDOW_SAMPLES)


def make_windows(wave, max_windows: int, *, name: str = "<array>") -> np.ndarray:
    """(T,) waveform -> (n, 160000) float32, zero-padded at the end; audio past max_windows*10 s is dropped (warns)."""
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"{name}: expected a mono waveform of shape (samples,), got {wave.shape}")
    count = num_windows(wave.shape[0], max_windows)
    kept = count * WINDOW_SAMPLES
    if wave.shape[0] > kept:
        dropped = (wave.shape[0] - kept) / SAMPLE_RATE
        warnings.warn(f"{name}: audio is {wave.shape[0] / SAMPLE_RATE:.2f} s, longer than {max_windows} windows "
                      f"({kept / SAMPLE_RATE:.0f} s); dropped the last {dropped:.2f} s", stacklevel=2)
    windows = np.zeros((kept,), np.float32)
    used = min(wave.shape[0], kept)
    windows[:used] = wave[:used]
    return windows.reshape(count, WINDOW_SAMPLES)


def pad_batch(windows: Sequence[np.ndarray], num_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Examples' (n_i, 160000) windows -> audio (B, W, 160000) float32 and audio_mask (B, W) float32.

    W = num_windows, or the largest n_i; missing windows are all zeros with mask 0 (the reference collator).
    """
    if len(windows) == 0:
        raise ValueError("pad_batch: empty batch")
    counts = []
    for index, example in enumerate(windows):
        shape = np.shape(example)
        if len(shape) != 2 or shape[1] != WINDOW_SAMPLES or shape[0] < 1:
            raise ValueError(f"pad_batch: example {index} has shape {shape}, expected (n >= 1, {WINDOW_SAMPLES})")
        counts.append(shape[0])
    width = max(counts) if num_windows is None else num_windows
    if width < max(counts):
        raise ValueError(f"pad_batch: num_windows={num_windows} is smaller than an example's {max(counts)} windows")
    audio = np.zeros((len(windows), width, WINDOW_SAMPLES), np.float32)
    mask = np.zeros((len(windows), width), np.float32)
    for index, (example, count) in enumerate(zip(windows, counts)):
        audio[index, :count] = example
        mask[index, :count] = 1.0
    return audio, mask


def pad_audios(audios: Sequence[Sequence[np.ndarray]], num_audios: int | None = None,
               num_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Several audios per row (generation requests, few-shot or chat examples), each a list of (n_ia, 160000)
    windows -> audio (B, A, W, 160000) float32 and its mask (B, A, W): A = the most audios of a row (or
    `num_audios`), W = the most windows of an audio (or `num_windows`); a missing audio or window is zeros with
    mask 0. Audio a of a row goes to slot a."""
    if not audios or min(len(a) for a in audios) == 0:
        raise ValueError("pad_audios: every request (or example) needs at least one audio")
    slots = max(len(a) for a in audios) if num_audios is None else num_audios
    if slots < max(len(a) for a in audios):
        raise ValueError(f"pad_audios: num_audios={num_audios} is smaller than a request's {max(map(len, audios))}")
    flat = [w for request in audios for w in request]
    _, per = pad_batch(flat, num_windows)  # checks every audio's shape; width = the longest audio
    width = per.shape[1]
    audio = np.zeros((len(audios), slots, width, WINDOW_SAMPLES), np.float32)
    mask = np.zeros((len(audios), slots, width), np.float32)
    for row, request in enumerate(audios):
        for slot, windows in enumerate(request):
            audio[row, slot, :len(windows)] = windows
            mask[row, slot, :len(windows)] = 1.0
    return audio, mask
