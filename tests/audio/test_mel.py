"""log_mel against the reference's golden mel (torchaudio) and an independent float64 librosa computation."""
import pathlib
import subprocess
import sys

import chex
import jax
import librosa
import numpy as np
import pytest

from af2_jax.audio.mel import HOP, N_FFT, N_MELS, NUM_FRAMES, log_mel
from af2_jax.audio.windows import WINDOW_SAMPLES

REPO = pathlib.Path(__file__).resolve().parents[2]
_log_mel = jax.jit(log_mel)


def librosa_log_mel_float64(wave):
    """The reference's MelSpectrogram + AmplitudeToDB restated with librosa in float64, (frames, mels)."""
    power = librosa.feature.melspectrogram(
        y=np.asarray(wave, np.float64), sr=16000, n_fft=1024, hop_length=160, win_length=1024, window="hann",
        center=True, pad_mode="reflect", power=2.0, n_mels=64, fmin=50.0, fmax=8000.0, htk=True, norm=None,
        dtype=np.float64)
    return librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None).T


def test_constants():
    assert (N_FFT, HOP, N_MELS, NUM_FRAMES) == (1024, 160, 64, 1001)


def test_fixture_mel_within_tolerance(fixture_inputs, fixture_outputs):
    mel = np.asarray(_log_mel(fixture_inputs["audio_x"]))
    expected = fixture_outputs["mel"]
    chex.assert_shape(mel, expected.shape)
    chex.assert_type(mel, np.float32)
    diff = np.abs(mel - expected).max()
    print(f"max abs diff vs golden mel: {diff:.3e} dB")
    assert diff <= 1e-3
    padded = fixture_inputs["audio_x_mask"] == 0
    np.testing.assert_array_equal(mel[padded], np.full_like(mel[padded], -100.0))


def test_random_signal_matches_float64_librosa():
    rng = np.random.default_rng(0)
    t = np.arange(WINDOW_SAMPLES) / 16000
    chirp = np.sin(2 * np.pi * (100 * t + 350 * t ** 2))
    loud = 0.5 * chirp + 0.2 * rng.standard_normal(WINDOW_SAMPLES)
    quiet = 1e-3 * rng.standard_normal(WINDOW_SAMPLES) * (t > 5)  # silence then -60 dB noise
    waves = np.clip(np.stack([loud, quiet]), -1, 1).astype(np.float32)
    mel = np.asarray(_log_mel(waves))
    expected = np.stack([librosa_log_mel_float64(w) for w in waves])
    diff = np.abs(mel - expected).max()
    print(f"max abs diff vs float64 librosa: {diff:.3e} dB")
    np.testing.assert_allclose(mel, expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("windows", [1, 3])
def test_shapes_for_small_window_counts(windows):
    waves = np.random.default_rng(windows).uniform(-1, 1, (2, windows, WINDOW_SAMPLES)).astype(np.float32)
    mel = _log_mel(waves)
    chex.assert_shape(mel, (2, windows, NUM_FRAMES, N_MELS))
    chex.assert_type(mel, np.float32)
    np.testing.assert_array_equal(np.asarray(mel)[1, 0], np.asarray(_log_mel(waves[1, 0])))


def test_jit_compiles_for_30_windows():
    waves = np.zeros((1, 30, WINDOW_SAMPLES), np.float32)
    waves[0, 0] = np.random.default_rng(30).uniform(-1, 1, WINDOW_SAMPLES)
    mel = np.asarray(_log_mel(waves))
    chex.assert_shape(mel, (1, 30, NUM_FRAMES, N_MELS))
    assert np.all(np.isfinite(mel))
    np.testing.assert_allclose(mel[0, 0], librosa_log_mel_float64(waves[0, 0]), atol=2e-4, rtol=0)
    np.testing.assert_array_equal(mel[0, 1:], np.full_like(mel[0, 1:], -100.0))


def test_bad_shape_is_rejected():
    with pytest.raises(ValueError, match="160000"):
        log_mel(np.zeros((2, 16000), np.float32))


def test_filterbank_matches_librosa_and_runs_without_it():
    expected = librosa.filters.mel(sr=16000, n_fft=N_FFT, n_mels=N_MELS, fmin=50.0, fmax=8000.0, htk=True, norm=None,
                                   dtype=np.float64).T
    code = ("import sys; sys.modules['librosa'] = None\n"
            "import numpy as np, af2_jax.audio.mel as mel\n"
            "print(mel.mel_filterbank().astype(np.float64).tobytes().hex())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"JAX_PLATFORMS": "cpu"}, cwd=REPO)
    assert result.returncode == 0, result.stderr
    filters = np.frombuffer(bytes.fromhex(result.stdout.strip()), np.float64).reshape(N_FFT // 2 + 1, N_MELS)
    chex.assert_shape(filters, (N_FFT // 2 + 1, N_MELS))
    np.testing.assert_allclose(filters, expected, atol=1e-6, rtol=0)
