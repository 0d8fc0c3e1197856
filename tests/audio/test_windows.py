"""Windowing and batching against the reference formula and the golden fixture's audio_x / audio_x_mask."""
import math
import warnings

import chex
import numpy as np
import pytest

from af2_jax.audio.windows import SAMPLE_RATE, WINDOW_SAMPLES, make_windows, num_windows, pad_batch


def reference_num_windows(length, max_windows):
    # The reference's get_num_windows, restated independently (overlap 0).
    if length <= WINDOW_SAMPLES:
        return 1
    if length >= max_windows * WINDOW_SAMPLES:
        return max_windows
    return 1 + int(np.ceil((length - WINDOW_SAMPLES) / float(WINDOW_SAMPLES)))


@pytest.mark.parametrize("max_windows", [3, 12, 30])
def test_num_windows_matches_reference_formula(max_windows):
    lengths = [0, 1, WINDOW_SAMPLES - 1, WINDOW_SAMPLES, WINDOW_SAMPLES + 1, 2 * WINDOW_SAMPLES,
               2 * WINDOW_SAMPLES + 1, max_windows * WINDOW_SAMPLES - 1, max_windows * WINDOW_SAMPLES,
               max_windows * WINDOW_SAMPLES + 7, 40 * WINDOW_SAMPLES]
    lengths += list(np.random.default_rng(0).integers(0, 35 * WINDOW_SAMPLES, 200))
    for length in lengths:
        assert num_windows(int(length), max_windows) == reference_num_windows(int(length), max_windows), length


@pytest.mark.parametrize("seconds, max_windows, expected", [(4.6, 12, 1), (25.0, 3, 3), (300.0, 30, 30)])
def test_make_windows_shapes_and_zero_padding(seconds, max_windows, expected):
    wave = np.random.default_rng(1).uniform(-1, 1, int(seconds * SAMPLE_RATE)).astype(np.float32)
    windows = make_windows(wave, max_windows)
    chex.assert_shape(windows, (expected, WINDOW_SAMPLES))
    chex.assert_type(windows, np.float32)
    flat = windows.reshape(-1)
    np.testing.assert_array_equal(flat[:wave.size], wave)
    assert not np.any(flat[wave.size:])


def test_make_windows_crops_and_warns_with_dropped_duration():
    wave = np.random.default_rng(2).uniform(-1, 1, int(32.5 * SAMPLE_RATE)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"clip\.wav.*dropped the last 2\.50 s"):
        windows = make_windows(wave, 3, name="clip.wav")
    chex.assert_shape(windows, (3, WINDOW_SAMPLES))
    np.testing.assert_array_equal(windows.reshape(-1), wave[:3 * WINDOW_SAMPLES])


def test_make_windows_does_not_warn_when_nothing_is_dropped():
    wave = np.ones(3 * WINDOW_SAMPLES, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_windows(wave, 3)


def test_make_windows_rejects_non_mono_naming_the_source():
    with pytest.raises(ValueError, match=r"song\.flac.*shape"):
        make_windows(np.zeros((100, 2), np.float32), 3, name="song.flac")


@pytest.mark.parametrize("counts, width", [([1, 3, 2], None), ([1, 1], 1), ([2, 1], 5)])
def test_pad_batch_appends_zero_windows_with_mask_zero(counts, width):
    rng = np.random.default_rng(3)
    examples = [rng.uniform(-1, 1, (n, WINDOW_SAMPLES)).astype(np.float32) for n in counts]
    audio, mask = pad_batch(examples, width)
    expected_width = max(counts) if width is None else width
    chex.assert_shape(audio, (len(counts), expected_width, WINDOW_SAMPLES))
    chex.assert_shape(mask, (len(counts), expected_width))
    chex.assert_type([audio, mask], np.float32)
    for index, (example, n) in enumerate(zip(examples, counts)):
        np.testing.assert_array_equal(audio[index, :n], example)
        assert not np.any(audio[index, n:])
        np.testing.assert_array_equal(mask[index], (np.arange(expected_width) < n).astype(np.float32))


def test_pad_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        pad_batch([])
    with pytest.raises(ValueError, match="example 1"):
        pad_batch([np.zeros((1, WINDOW_SAMPLES), np.float32), np.zeros((1, 10), np.float32)])
    with pytest.raises(ValueError, match="smaller"):
        pad_batch([np.zeros((3, WINDOW_SAMPLES), np.float32)], num_windows=2)


def test_fixture_windows_padding_matches_reference_layout(fixture_inputs):
    # Window counts and the padded tail follow from the PCM lengths alone (independent of io.prepare).
    audio_x, mask = fixture_inputs["audio_x"], fixture_inputs["audio_x_mask"]
    for index in range(audio_x.shape[0]):
        length = fixture_inputs[f"wav_pcm16_{index}"].shape[0]
        count = math.ceil(length / WINDOW_SAMPLES)
        assert num_windows(length, 12) == count == int(mask[index].sum())
        assert not np.any(audio_x[index].reshape(-1)[length:])
