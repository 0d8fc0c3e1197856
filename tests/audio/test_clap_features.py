"""AF-CLAP's audio front end against the afclap_tiny fixture (the reference's torchaudio front end run on the
fixture's WAV files) and the bilinear antialiased resize against torch.nn.functional.interpolate."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from af2_jax.audio import clap_features as cf
from af2_jax.audio.mel import log_mel

REPO = pathlib.Path(__file__).resolve().parents[2]
# measured on wav_pcm16_1: our float32 mel is within 3.4e-5 dB of a float64 numpy computation, the reference's
# float32 torchaudio mel up to 1.1e-3 dB from it (one bin at +4 dB); 99.9% of bins differ by < 3e-4 dB
DB_TOL = dict(atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def afclap_dir(afclap_fixture_dir) -> pathlib.Path:
    return afclap_fixture_dir  # tests/conftest.py: ../shared/fixtures/afclap_tiny or $AF2_JAX_FIXTURES


@pytest.fixture(scope="module")
def fixture(afclap_dir):
    return dict(np.load(afclap_dir / "inputs.npz")), json.loads((afclap_dir / "config.json").read_text())


def _check(name, got, expected, tol=DB_TOL):
    print(f"{name}: max|diff| {np.abs(got - expected).max():.3g}")
    np.testing.assert_allclose(got, expected, **tol, err_msg=name)


def test_short_clips_match_fixture(fixture):
    """<= 10 s: repeat-padded (4.0 s and 7.3 s tiled, 10.0 s unchanged), 4 identical channels, not longer."""
    inputs, _ = fixture
    for i in range(3):
        mel_fusion, longer = cf.clap_audio_features(cf.pcm16_to_float(inputs[f"wav_pcm16_{i}"]))
        assert not longer and mel_fusion.shape == (4, 1001, 64) and mel_fusion.dtype == np.float32
        _check(f"mel[{i}]", mel_fusion[0], inputs["mel"][i])
        assert all(np.array_equal(mel_fusion[0], mel_fusion[c]) for c in range(1, 4))


def test_long_clip_matches_fixture(fixture):
    """> 10 s: whole-clip mel, the 3 crops at the recorded starts, channel 0 the antialiased resize."""
    inputs, config = fixture
    chunks = config["audio"]["fusion_chunks"]["3"]
    wave = cf.pcm16_to_float(inputs["wav_pcm16_3"])
    full = cf.log_mel_frames(cf.int16_round_trip(wave))
    assert full.shape == (chunks["total_frames"], 64)
    _check("mel_full_3", full, inputs["mel_full_3"])
    starts = tuple(chunks["front_middle_back_start"])
    mel_fusion, longer = cf.clap_audio_features(wave, starts=starts)
    assert longer
    _check("mel_fusion_local_3", mel_fusion[1:], inputs["mel_fusion_local_3"])
    _check("mel[3] (resized whole mel)", mel_fusion[0], inputs["mel"][3])
    # the resize alone, from the reference's own full mel: float32 rounding only
    _check("resize(mel_full_3)", cf.resize_bilinear_antialias(inputs["mel_full_3"], (1001, 64)), inputs["mel"][3],
           dict(atol=1e-4, rtol=1e-6))


def test_random_crops_follow_the_reference_stream(fixture):
    """A RandomState seeded as the reference's np.random.seed (config.json) draws the recorded starts; a Generator
    draws one start per third; the whole batch comes out as the reference stacked it."""
    inputs, config = fixture
    chunks = config["audio"]["fusion_chunks"]["3"]
    seed = config["audio"]["numpy_seed_before_front_end"]
    starts = cf.fusion_starts(chunks["total_frames"], np.random.RandomState(seed))
    assert list(starts) == chunks["front_middle_back_start"]
    waves = [cf.pcm16_to_float(inputs[f"wav_pcm16_{i}"]) for i in range(4)]
    mel_fusion, longer = cf.clap_audio_batch(waves, rng=np.random.RandomState(seed))
    np.testing.assert_array_equal(longer, inputs["longer"])
    _check("batch mel", mel_fusion[:, 0], inputs["mel"])
    _check("batch crops", mel_fusion[3, 1:], inputs["mel_fusion_local_3"])
    total = chunks["total_frames"]
    valid = total - 1001 + 1
    for seed in range(20):
        front, middle, back = cf.fusion_starts(total, np.random.default_rng(seed))
        assert 0 <= front < valid // 3 <= middle < 2 * valid // 3 <= back < valid
    assert cf.fusion_starts(1003, np.random.default_rng(0)) == (0, 1, 2)  # one start per third
    assert cf.fusion_starts(1002, np.random.default_rng(0))[2] == 0  # an empty third falls back to 0


def test_edge_lengths():
    rng = np.random.default_rng(0)
    tone = (0.3 * np.sin(np.arange(160050) * 0.05)).astype(np.float32)
    # between 10 s and 10 s + one hop: 1001 frames, the short layout, no resize
    mel_fusion, longer = cf.clap_audio_features(tone, rng=rng)
    assert not longer and mel_fusion.shape == (4, 1001, 64)
    np.testing.assert_allclose(mel_fusion[0], cf.log_mel_frames(cf.int16_round_trip(tone)), atol=0)
    # the repeat-pad: floor(160000 / len) copies then zeros
    clip = np.arange(1, 70001, dtype=np.float32)
    padded = cf.repeat_pad(clip)
    np.testing.assert_array_equal(padded[:140000], np.tile(clip, 2))
    assert not padded[140000:].any() and padded.shape == (160000,)
    np.testing.assert_array_equal(cf.repeat_pad(clip[:22857]), np.append(np.tile(clip[:22857], 7), 0))  # 7 x 22857 + 1
    with pytest.raises(ValueError, match="starts"):
        cf.clap_audio_features(np.zeros(200000, np.float32), starts=(0, 10, 400))
    with pytest.raises(ValueError, match="1-D"):
        cf.clap_audio_features(np.zeros((2, 100), np.float32))


def test_int16_round_trip_and_pcm():
    x = np.array([-2.0, -1.0, -0.50001, 0.0, 1e-5, 0.99999, 1.5], np.float32)
    expected = (np.trunc(np.clip(x, -1, 1) * 32767) / 32767).astype(np.float32)
    np.testing.assert_array_equal(cf.int16_round_trip(x), expected)
    np.testing.assert_array_equal(cf.pcm16_to_float(np.array([-32768, 0, 16384], np.int16)),
                                  np.array([-1.0, 0.0, 0.5], np.float32))


def test_any_length_mel_is_af2s_mel_at_10_s():
    """log_mel_frames on other lengths is the same computation as af2_jax.audio.mel.log_mel: equal on the common
    frames of a 10 s window embedded in a longer clip (away from the reflect-padded edges)."""
    rng = np.random.default_rng(1)
    wave = (0.1 * rng.standard_normal(176000)).astype(np.float32)
    long = cf.log_mel_frames(wave)
    assert long.shape == (1101, 64)
    window = np.asarray(log_mel(wave[16000:176000]))
    np.testing.assert_allclose(long[100 + 4:1101 - 4], window[4:-4], atol=1e-4)


@pytest.mark.parametrize("shape,size", [((1351, 64), (1001, 64)), ((7, 1, 40, 33), (13, 90)), ((2, 64, 50), (20, 7)),
                                        ((5, 5), (5, 5)), ((3, 17), (1, 1)), ((1002, 64), (1001, 64))])
def test_antialias_resize_matches_torch(shape, size):
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32) * 20 - 30
    t = torch.from_numpy(x.reshape(-1, 1, *shape[-2:]))
    expected = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False,
                                               antialias=True).numpy().reshape(*shape[:-2], *size)
    got = cf.resize_bilinear_antialias(x, size)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-6)
