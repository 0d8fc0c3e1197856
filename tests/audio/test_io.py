"""Decoding and preparing audio files: golden fixture bit for bit, reference semantics restated in float64, and
clear errors for bad files."""
import warnings

import librosa
import numpy as np
import pytest
import soundfile

from af2_jax.audio import io
from af2_jax.audio.io import AudioError, SilentAudioWarning, decode, load_audio, prepare
from af2_jax.audio.windows import make_windows, pad_batch


def reference_prepare(data, rate, target_rate=16000):
    """The reference read_audio + int16 round trip, restated in float64 numpy (mono or (frames, channels) input)."""
    data = np.asarray(data, np.float64)
    if data.max() > 1 or data.min() < -1:
        data = data / max(abs(data.max()), abs(data.min()))
    if rate != target_rate:
        data = librosa.resample(data.T if data.ndim == 2 else data, orig_sr=rate, target_sr=target_rate)
        data = data[0] if data.ndim == 2 else data
    elif data.ndim == 2:
        data = data.T[0]
    if data.min() >= 0:
        data = 2 * data / abs(data.max()) - 1.0
    else:
        data = data / max(abs(data.max()), abs(data.min()))
    return ((np.clip(data, -1.0, 1.0) * 32767.0).astype(np.int16) / 32767.0).astype(np.float32)


def tone(seconds, rate, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    columns = [0.4 * np.sin(2 * np.pi * (300 + 200 * c) * t) + 0.05 * rng.standard_normal(t.size)
               for c in range(channels)]
    return np.stack(columns, axis=1)


def snr_db(clean, decoded):
    return 10 * np.log10(np.sum(clean ** 2) / np.sum((decoded - clean) ** 2))


def test_fixture_wav_files_reproduce_audio_x_bit_for_bit(tmp_path, fixture_inputs):
    windows = []
    for index in range(2):
        path = tmp_path / f"example{index}.wav"
        soundfile.write(path, fixture_inputs[f"wav_pcm16_{index}"], 16000, subtype="PCM_16")
        windows.append(make_windows(load_audio(path), 12, name=str(path)))
    audio_x, audio_x_mask = pad_batch(windows)
    assert audio_x.dtype == np.float32 and audio_x_mask.dtype == np.float32
    np.testing.assert_array_equal(audio_x.view(np.uint32), fixture_inputs["audio_x"].view(np.uint32))
    np.testing.assert_array_equal(audio_x_mask, fixture_inputs["audio_x_mask"])


@pytest.mark.parametrize("rate", [44100, 8000])
def test_resampling_matches_librosa_resample(tmp_path, rate):
    samples = tone(0.5, rate)
    path = tmp_path / f"at{rate}.wav"
    soundfile.write(path, samples, rate, subtype="FLOAT")
    wave = load_audio(path)
    expected = reference_prepare(samples[:, 0], rate)
    assert wave.shape == expected.shape == (8000,)
    np.testing.assert_array_equal(wave, expected)


def test_multichannel_keeps_channel_zero(tmp_path):
    samples = tone(0.3, 16000, channels=3)
    samples[:, 1:] *= 2.0  # louder other channels must not change channel 0's normalisation
    path = tmp_path / "three.wav"
    soundfile.write(path, samples / 2.0, 16000, subtype="FLOAT")
    stored, _ = soundfile.read(path, dtype="float64")  # float32 in the file
    wave = load_audio(path)
    np.testing.assert_array_equal(wave, reference_prepare(stored[:, 0], 16000))
    assert not np.array_equal(wave, reference_prepare(stored[:, 1], 16000))


def test_multichannel_resampled_keeps_channel_zero(tmp_path):
    samples = tone(0.3, 44100, channels=2)
    path = tmp_path / "stereo.flac"
    soundfile.write(path, samples, 44100, subtype="PCM_24")
    decoded, rate = decode(path)
    np.testing.assert_array_equal(load_audio(path), reference_prepare(decoded[:, 0], rate))


def test_out_of_range_data_is_divided_by_peak_first():
    samples = tone(0.2, 16000, channels=2) * 20000.0  # integer-scaled data, as some decoders give
    np.testing.assert_array_equal(prepare(samples, 16000), reference_prepare(samples, 16000))


def test_no_negative_sample_maps_zero_to_minus_one():
    samples = np.abs(tone(0.1, 16000)[:, 0])
    samples[7] = 0.0
    wave = prepare(samples, 16000)
    np.testing.assert_array_equal(wave, reference_prepare(samples, 16000))
    assert wave[7] == -1.0 and wave.max() == 1.0


def test_output_values_are_int16_steps():
    wave = prepare(tone(0.2, 16000), 16000)
    steps = np.round(wave.astype(np.float64) * 32767.0)
    np.testing.assert_array_equal(wave, (steps / 32767.0).astype(np.float32))
    assert np.abs(steps).max() <= 32767


def test_start_and_duration_read_a_slice(tmp_path):
    pcm = (tone(1.0, 16000)[:, 0] * 32767).astype(np.int16)
    path = tmp_path / "slice.wav"
    soundfile.write(path, pcm, 16000, subtype="PCM_16")
    samples, rate = decode(path, start=0.25, duration=0.5)
    assert rate == 16000
    np.testing.assert_array_equal(samples[:, 0], pcm[4000:12000] / 32768.0)
    np.testing.assert_array_equal(load_audio(path, start=0.25, duration=0.5),
                                  reference_prepare(pcm[4000:12000] / 32768.0, 16000))


def test_flac_is_lossless_and_ogg_decodes(tmp_path):
    pcm = (tone(0.5, 16000)[:, 0] * 32767).astype(np.int16)
    flac = tmp_path / "clip.flac"
    soundfile.write(flac, pcm, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(flac), reference_prepare(pcm / 32768.0, 16000))
    ogg = tmp_path / "clip.ogg"
    soundfile.write(ogg, pcm / 32768.0, 16000, format="OGG", subtype="VORBIS")
    decoded, rate = decode(ogg)
    assert rate == 16000 and decoded.shape == (pcm.size, 1)
    assert snr_db(pcm / 32768.0, decoded[:, 0]) > 15.0  # lossy codec
    np.testing.assert_array_equal(load_audio(ogg), reference_prepare(decoded, rate))


def test_mp3_decodes_offline_through_libsndfile(tmp_path):
    samples = tone(0.5, 22050, channels=2)
    path = tmp_path / "clip.mp3"
    soundfile.write(path, samples, 22050, format="MP3")
    decoded, rate = decode(path)
    assert rate == 22050 and decoded.shape == samples.shape
    assert snr_db(samples, decoded) > 15.0  # lossy codec
    wave = load_audio(path)
    np.testing.assert_array_equal(wave, reference_prepare(decoded, rate))
    assert wave.shape == (8000,)


def test_mp3_without_libsndfile_support_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp3"
    soundfile.write(path, tone(0.1, 16000), 16000, format="MP3")
    formats = {k: v for k, v in soundfile.available_formats().items() if k != "MP3"}
    monkeypatch.setattr(soundfile, "available_formats", lambda: formats)
    with pytest.raises(AudioError, match=r"clip\.mp3: mp3 needs libsndfile"):
        load_audio(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.wav"
    with pytest.raises(AudioError, match=r"nowhere\.wav: file not found"):
        load_audio(path)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(AudioError, match="not a regular file"):
        load_audio(tmp_path)


@pytest.mark.parametrize("content", [b"", b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" * 4, bytes(range(256)) * 8])
def test_corrupt_bytes(tmp_path, content):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=r"broken\.wav: cannot decode audio"):
        load_audio(path)


def test_truncated_flac(tmp_path):
    path = tmp_path / "cut.flac"
    soundfile.write(path, tone(1.0, 16000), 16000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(AudioError, match=r"cut\.flac: "):
        load_audio(path)


def test_zero_length_audio(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros((0, 1)), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match=r"empty\.wav: no audio samples"):
        load_audio(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
    samples = tone(0.1, 16000)
    samples[100, 0] = bad
    path = tmp_path / "nonfinite.wav"
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nonfinite\.wav: 1 NaN or infinite samples"):
        load_audio(path)


def test_all_silent_audio_stays_silent_with_a_warning(tmp_path):
    path = tmp_path / "quiet.wav"
    soundfile.write(path, np.zeros((16000, 2)), 16000, subtype="PCM_16")
    with pytest.warns(SilentAudioWarning, match=r"quiet\.wav: audio is all silent"):
        wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.shape == (16000,)
    assert not np.any(wave)


def test_all_silent_audio_can_be_rejected_by_a_warning_filter(tmp_path):
    path = tmp_path / "quiet.wav"
    soundfile.write(path, np.zeros(800), 16000, subtype="PCM_16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SilentAudioWarning)
        with pytest.raises(SilentAudioWarning, match=r"quiet\.wav"):
            load_audio(path)


def test_bad_arrays_name_the_source():
    with pytest.raises(AudioError, match=r"mic: expected samples"):
        prepare(np.zeros((2, 3, 4)), 16000, name="mic")
    with pytest.raises(AudioError, match=r"mic: bad sample rate"):
        prepare(np.ones(10), 0, name="mic")
    assert issubclass(AudioError, ValueError)
    assert io.AudioError("a.wav", "broken").source == "a.wav"
