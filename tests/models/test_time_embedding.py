"""The optional audio time embedding (not in AF2; AF2Config.audio_time_embedding): the sinusoids against a float64
numpy formula, where the encoder adds them, that they are off by default, survive our checkpoint format and block
an export to NVIDIA's PyTorch layout (which has no such embedding)."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax import pretrained
from af2_jax.audio.mel import log_mel
from af2_jax.convert.af2_release import export_state_dict
from af2_jax.models.af2 import AF2Model, af2_preset
from af2_jax.models.audio_encoder import time_embedding


def numpy_time_embedding(num_windows: int, dim: int) -> np.ndarray:
    """Token k of window w (64 tokens = 2 mel halves x 32 time steps) sits at time step 32 w + k mod 32."""
    out = np.zeros((num_windows * 64, dim))
    for w in range(num_windows):
        for k in range(64):
            t = 32 * w + k % 32
            for i in range(dim // 2):
                angle = t / 10000.0 ** (2 * i / dim)
                out[64 * w + k, i], out[64 * w + k, dim // 2 + i] = np.sin(angle), np.cos(angle)
    return out


def test_sinusoids_match_float64_formula_across_windows():
    got = np.asarray(time_embedding(3, 128))
    want = numpy_time_embedding(3, 128)
    assert got.shape == (192, 128)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.array_equal(got[64:96], got[96:128])  # both mel halves of a time step share its time
    assert not np.allclose(got[0:32], got[64:96])  # window 1 continues the time of window 0


@pytest.fixture(scope="module")
def configs():
    base = af2_preset("tiny")
    base = dataclasses.replace(base, htsat=dataclasses.replace(base.htsat, depths=(2, 2, 2, 2)))
    return base, dataclasses.replace(base, audio_time_embedding=True)


def test_encoder_adds_the_embedding_to_htsat_tokens_only_when_enabled(configs):
    off_config, on_config = configs
    assert not af2_preset("tiny").audio_time_embedding and not af2_preset("3b").audio_time_embedding
    off, on = AF2Model(off_config, rngs=nnx.Rngs(0)), AF2Model(on_config, rngs=nnx.Rngs(0))
    audio = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, (1, 2, 160000)), jnp.float32)
    mask = jnp.ones((1, 2), bool)
    media_on, _ = on.encode_audio(audio, mask)
    media_off, _ = off.encode_audio(audio, mask)
    tokens = off.htsat(log_mel(audio), train=False).reshape(1, 128, -1)
    want = off.audio_transformer(tokens + jnp.asarray(numpy_time_embedding(2, tokens.shape[-1]), jnp.float32),
                                 jnp.ones((1, 128), jnp.float32))
    np.testing.assert_allclose(np.asarray(media_on), np.asarray(want), atol=1e-4)
    assert np.abs(np.asarray(media_on) - np.asarray(media_off)).max() > 0.1


def test_flag_survives_our_format_and_blocks_the_pytorch_export(configs, tmp_path):
    _, on_config = configs
    model = AF2Model(on_config, rngs=nnx.Rngs(0))
    pretrained.save(tmp_path / "m", on_config, model)
    assert pretrained.read_config(tmp_path / "m")[1].audio_time_embedding
    with pytest.raises(ValueError, match="audio_time_embedding"):
        export_state_dict(on_config, {})
