"""Audio files -> the reference's mono 16 kHz float32 waveform (AF2 `inference.read_audio` semantics).

Decoding goes through libsndfile (python-soundfile): wav, flac, ogg/vorbis, mp3 (libsndfile >= 1.1 built with
mpg123, as the soundfile 0.14 wheels are) and the other formats it lists. No ffmpeg is used, so nothing here needs
a system package. Every failure is an `AudioError` naming the file and the problem. See docs/AUDIO.md.

`af2_jax.models` must never import this module (it pulls in soundfile and librosa).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

TARGET_RATE = 16000
_INT16_SCALE = 32767.0  # the reference scales by int16 max (not 32768) both ways


class AudioError(ValueError):
    """An audio input that cannot be used; the message names the source (file) and the problem."""

    def __init__(self, source: str, problem: str):
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


class SilentAudioWarning(UserWarning):
    """All-silent audio kept as zeros (the reference would divide by zero). Filter it to 'error' to reject."""


def decode(path, *, start: float = 0.0, duration: float | None = None) -> tuple[np.ndarray, int]:
    """Reads `duration` seconds (all if None) from `start` seconds: float64 (frames, channels), and the file's rate."""
    import soundfile

    name = os.fspath(path)
    if not os.path.exists(name):
        raise AudioError(name, "file not found")
    if not os.path.isfile(name):
        raise AudioError(name, "not a regular file")
    if start < 0 or (duration is not None and duration <= 0):
        raise AudioError(name, f"bad read range start={start} s, duration={duration} s")
    if name.lower().endswith(".mp3") and "MP3" not in soundfile.available_formats():
        raise AudioError(name, f"mp3 needs libsndfile >= 1.1 built with mpg123; this one is "
                               f"{soundfile.__libsndfile_version__} without mp3 support (convert the file to flac or wav)")
    try:
        with soundfile.SoundFile(name) as audio:
            rate = int(audio.samplerate)
            first = int(start * rate)
            frames = -1 if duration is None else int(duration * rate)
            if audio.seekable() and first > 0:
                audio.seek(min(first, audio.frames))
            elif first > 0:
                audio.read(first, dtype="float64")  # unseekable stream: skip by reading
            samples = audio.read(frames, dtype="float64", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, OSError, EOFError) as error:
        raise AudioError(name, f"cannot decode audio ({error})") from error
    if rate <= 0:
        raise AudioError(name, f"invalid sample rate {rate}")
    return samples, rate


def prepare(samples, sample_rate: int, *, name: str = "<array>", target_rate: int = TARGET_RATE) -> np.ndarray:
    """Decoded samples -> the reference's model-ready mono waveform: float32, values exactly k/32767.

    Steps (reference order): divide by the peak if outside [-1, 1]; librosa.resample (defaults) of every channel;
    keep channel 0; peak-normalise ([0, max] -> [-1, 1] when nothing is negative); int16 round trip.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise AudioError(name, f"expected samples of shape (frames,) or (frames, channels), got {x.shape}")
    if x.size == 0:
        raise AudioError(name, f"no audio samples (shape {x.shape})")
    if not np.all(np.isfinite(x)):
        raise AudioError(name, f"{int(np.sum(~np.isfinite(x)))} NaN or infinite samples")
    if int(sample_rate) != sample_rate or sample_rate <= 0 or target_rate <= 0:
        raise AudioError(name, f"bad sample rate {sample_rate} (target {target_rate})")

    # Integer-scaled or out-of-range float data: the reference divides every channel by the global peak first.
    high, low = x.max(), x.min()
    if high > 1 or low < -1:
        x = x / max(abs(high), abs(low))

    if int(sample_rate) != target_rate:
        import librosa

        # Resampling all channels, then taking channel 0, is what the reference does (same result per channel).
        mono = librosa.resample(x.T, orig_sr=int(sample_rate), target_sr=target_rate)[0]
        if mono.size == 0:
            raise AudioError(name, f"too short to resample from {sample_rate} Hz to {target_rate} Hz")
    else:
        mono = x[:, 0]

    mono = _peak_normalise(mono, name)
    return _int16_round_trip(mono)


def load_audio(path, *, target_rate: int = TARGET_RATE, start: float = 0.0,
               duration: float | None = None) -> np.ndarray:
    """decode + prepare. For the reference's exact peak on long files, pass duration = max_windows * 10 s."""
    samples, rate = decode(path, start=start, duration=duration)
    return prepare(samples, rate, name=os.fspath(path), target_rate=target_rate)


def _peak_normalise(mono: np.ndarray, name: str) -> np.ndarray:
    high, low = mono.max(), mono.min()
    if high == 0 and low == 0:
        # The reference computes 0/0 = NaN here, which would poison the whole batch; silence stays silence.
        warnings.warn(f"{name}: audio is all silent; kept as zeros (the reference would produce NaN)",
                      SilentAudioWarning, stacklevel=3)
        return np.zeros_like(mono)
    if low >= 0:
        return 2.0 * mono / abs(high) - 1.0  # no negative sample: the reference maps [0, max] onto [-1, 1]
    return mono / max(abs(high), abs(low))


def _int16_round_trip(x: np.ndarray) -> np.ndarray:
    """float64 clip, *32767, truncate toward zero (the int16 cast), /32767 in float64, then float32."""
    quantised = (np.clip(x, -1.0, 1.0) * _INT16_SCALE).astype(np.int16)
    return (quantised / _INT16_SCALE).astype(np.float32)
