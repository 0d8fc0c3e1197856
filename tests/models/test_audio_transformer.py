"""Audio transformer and the whole audio encoder against the golden fixture (NVIDIA's PyTorch reference, fp32)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax import param_tree
from af2_jax.convert import af2_keys
from af2_jax.param_tree import unflatten
from af2_jax.convert.mapping import import_tensors
from af2_jax.convert.tensor_files import PrefixView, SafetensorsSource
from af2_jax.models.audio_encoder import encode_audio
from af2_jax.models.audio_transformer import AudioTransformer, audio_transformer_preset
from af2_jax.models.htsat import HTSAT, htsat_preset

TOL = dict(atol=1e-4, rtol=1e-4)  # fixture README: audio-transformer arrays


def _load(fixture_dir, make, rules, prefix):
    """Builds the module abstractly (no random init) and fills it from the fixture through the conversion table."""
    abstract = nnx.eval_shape(make)
    source = PrefixView(SafetensorsSource([fixture_dir / "state_dict.safetensors"]), prefix)
    arrays = import_tensors(rules, source, param_tree.param_targets(abstract))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, unflatten({k: jnp.asarray(v) for k, v in arrays.items()}))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def reference_modules(fixture_dir):
    at_config, htsat_config = audio_transformer_preset("tiny"), htsat_preset("tiny")
    at = _load(fixture_dir, lambda: AudioTransformer(at_config, rngs=nnx.Rngs(0)),
               af2_keys.audio_transformer_rules(at_config), "audio_transformer_clap.")
    htsat = _load(fixture_dir, lambda: HTSAT(htsat_config, rngs=nnx.Rngs(0)), af2_keys.htsat_rules(htsat_config),
                  "clap.nvclap.")
    return htsat, at


def test_matches_fixture_layer_by_layer(reference_modules, fixture_outputs):
    _, at = reference_modules
    out = fixture_outputs
    b, windows, tokens, c = out["htsat_out"].shape
    x = jnp.asarray(out["htsat_out"].reshape(b, windows * tokens, c))  # the reference's window-major flattening
    mask = jnp.asarray(out["audio_tokens_mask"])
    # padded rows are reproduced too, so every row is compared
    np.testing.assert_allclose(np.asarray(at.embed(x)), out["at_input_ln"], **TOL)
    for layers, name in [(1, "at_layer0"), (2, "at_layer1"), (3, "audio_transformer_out")]:
        np.testing.assert_allclose(np.asarray(at(x, mask, num_layers=layers)), out[name], **TOL, err_msg=name)
    np.testing.assert_allclose(np.asarray(at(x, mask)), out["audio_transformer_out"], **TOL)
    # a float mask and a boolean mask mean the same
    np.testing.assert_array_equal(np.asarray(at(x, mask)), np.asarray(at(x, mask > 0)))


def test_dropout_only_when_not_deterministic(reference_modules, fixture_outputs):
    _, at = reference_modules
    out = fixture_outputs
    x = jnp.asarray(out["htsat_out"].reshape(2, -1, out["htsat_out"].shape[-1]))
    mask = jnp.asarray(out["audio_tokens_mask"])
    base = np.asarray(at(x, mask))
    np.testing.assert_array_equal(np.asarray(at(x, mask, rngs=nnx.Rngs(dropout=3))), base)  # rngs ignored
    a = np.asarray(at(x, mask, deterministic=False, rngs=nnx.Rngs(dropout=3)))
    b = np.asarray(at(x, mask, deterministic=False, rngs=nnx.Rngs(dropout=3)))
    c = np.asarray(at(x, mask, deterministic=False, rngs=nnx.Rngs(dropout=4)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - base).max() > 1e-3
    with pytest.raises(ValueError, match="rngs"):
        at(x, mask, deterministic=False)
    with pytest.raises(ValueError, match="mask"):
        at(x, mask[:, :-1])


@pytest.mark.slow
def test_encoder_jits_for_30_windows_and_matches_fixture(reference_modules, fixture_outputs):
    """mel -> HTSAT -> audio transformer under jit at 30 windows. The fixture's 2 windows are followed by 28 silent
    padded windows (mask 0, -100 dB like the fixture's own padding): valid rows must equal the reference's output,
    since padded keys are masked and RoPE positions of the valid tokens do not change."""
    htsat, at = reference_modules
    out = fixture_outputs
    mel = np.full((2, 30, 1001, 64), -100.0, np.float32)
    mel[:, :2] = out["mel"]
    window_mask = np.zeros((2, 30), np.float32)
    window_mask[:, :2] = np.asarray(out["audio_tokens_mask"]).reshape(2, 2, 64)[:, :, 0]
    graphdefs, states = zip(*(nnx.split(m) for m in (htsat, at)))

    @jax.jit
    def run(states, mel, window_mask):
        h, a = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
        return encode_audio(h, a, mel, window_mask)

    tokens, token_mask = run(states, jnp.asarray(mel), jnp.asarray(window_mask))
    chex.assert_shape(tokens, (2, 30 * 64, at.config.d_model))
    chex.assert_shape(token_mask, (2, 30 * 64))
    chex.assert_tree_all_finite(tokens)
    np.testing.assert_array_equal(np.asarray(token_mask)[:, :128], out["audio_tokens_mask"])
    assert not np.asarray(token_mask)[:, 128:].any()
    valid = out["audio_tokens_mask"] > 0
    np.testing.assert_allclose(np.asarray(tokens)[:, :128][valid], out["audio_transformer_out"][valid], **TOL)
    with pytest.raises(ValueError, match="window_mask"):
        encode_audio(htsat, at, jnp.asarray(mel), jnp.asarray(window_mask[:, :3]))
