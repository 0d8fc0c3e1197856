"""AF2 with several audios per prompt: the (B, A, W, 160000) layout, each audio encoded as it would be alone, one
audio equal to today's single-audio model, the media-location mask seen from the logits (what may and may not
depend on which audio), and gradients in training mode (zero exactly where the mask hides an audio)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax.convert.af2_release import import_release
from af2_jax.models.af2 import AF2Model
from af2_jax.param_tree import unflatten

SAMPLES = 160000


@pytest.fixture(scope="module")
def models(fixture_dir):
    """(mask off, mask on): AF2's tiny reference weights (af2_tiny) with HTSAT's third stage cut to 2 blocks (the
    tiny preset with depths (2, 2, 2, 2)), gates scaled down as in test_generate; only the config flag differs."""
    config, params, _ = import_release(fixture_dir / "state_dict.safetensors", progress=False)
    config = dataclasses.replace(config, htsat=dataclasses.replace(config.htsat, depths=(2, 2, 2, 2)))
    params = {k: v[:2] if k.startswith("htsat/stages/2/blocks/") else v for k, v in params.items()}
    result = []
    for on in (False, True):
        graphdef, state = nnx.split(nnx.eval_shape(
            lambda on=on: AF2Model(dataclasses.replace(config, media_location_mask=on), rngs=nnx.Rngs(0))))
        state.replace_by_pure_dict(unflatten({k: jnp.asarray(v) for k, v in params.items()}))
        model = nnx.merge(graphdef, state)
        model.xattn.attn_gate[...] = model.xattn.attn_gate[...] * 0.1
        model.xattn.ff_gate[...] = model.xattn.ff_gate[...] * 0.1
        result.append(model)
    return tuple(result)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, audio, audio_mask):
    return nnx.merge(graphdef, state).encode_audio(audio, audio_mask)


@functools.partial(jax.jit, static_argnums=0)
def _text(graphdef, state, media, media_mask, ids, mask):
    return nnx.merge(graphdef, state).text_logits(media_mask, ids, mask, media=media)[0]


def encode(model, audio, audio_mask):
    graphdef, state = nnx.split(model)
    return _encode(graphdef, state, jnp.asarray(audio), jnp.asarray(audio_mask))


def text(model, media, media_mask, ids, mask):
    graphdef, state = nnx.split(model)
    return np.asarray(_text(graphdef, state, media, jnp.asarray(media_mask), jnp.asarray(ids), jnp.asarray(mask)))


def _waves(rng, n):
    return rng.uniform(-0.5, 0.5, size=(n, SAMPLES)).astype(np.float32)


@pytest.fixture(scope="module")
def data(models):
    """Two rows, 2 audio slots of up to 2 windows: row 0 has audios of 2 and 1 windows, row 1 one audio of 1
    window in slot 0 (slot 1 empty). Row 0's text: 2 tokens, <audio> at 2, text, <audio> at 7, text (T = 12)."""
    config = models[0].config
    rng = np.random.default_rng(11)
    audios = [[_waves(rng, 2), _waves(rng, 1)], [_waves(rng, 1)]]
    audio = np.zeros((2, 2, 2, SAMPLES), np.float32)
    audio_mask = np.zeros((2, 2, 2), np.float32)
    for row, clips in enumerate(audios):
        for slot, clip in enumerate(clips):
            audio[row, slot, :len(clip)], audio_mask[row, slot, :len(clip)] = clip, 1
    a = config.audio_token_id
    ids = rng.integers(0, 290, size=(2, 12)).astype(np.int32)
    ids[0, 2], ids[0, 7] = a, a
    ids[1, 0] = a
    mask = np.ones((2, 12), np.int32)
    mask[1, 10:] = 0  # right padding
    media, media_mask = encode(models[1], audio, audio_mask)
    return audios, audio, audio_mask, ids, mask, media, media_mask


@pytest.fixture(scope="module")
def alone(models, data):
    """Today's single-audio API on the three clips as one (B=3, W=2) batch (row i = clip i of `clips`)."""
    audios = data[0]
    clips = [(row, slot, clip) for row, row_clips in enumerate(audios) for slot, clip in enumerate(row_clips)]
    single = np.zeros((len(clips), 2, SAMPLES), np.float32)
    single_mask = np.zeros((len(clips), 2), np.float32)
    for i, (_, _, clip) in enumerate(clips):
        single[i, :len(clip)], single_mask[i, :len(clip)] = clip, 1
    media, media_mask = encode(models[0], single, single_mask)
    return clips, media, media_mask


def test_layout_is_slot_major_and_each_audio_is_encoded_as_alone(models, data, alone):
    """Slot a holds audio a's tokens at [a*W*64, a*W*64 + n_a*64), equal to the single-audio API's encoding of
    that clip (its own window count, the audio transformer over its windows only); the mask keeps the slots."""
    model = models[1]
    _, _, audio_mask, _, _, media, media_mask = data
    clips, alone_media, alone_mask = alone
    media, media_mask, alone_media = np.asarray(media), np.asarray(media_mask), np.asarray(alone_media)
    per_window = model.config.htsat.tokens_per_window
    assert media.shape == (2, 2 * 2 * per_window, model.config.audio_transformer.d_model)
    assert media_mask.shape == (2, 2, 2 * per_window)
    np.testing.assert_array_equal(media_mask, np.repeat(audio_mask, per_window, axis=-1))
    assert alone_media.shape == (3, 2 * per_window, media.shape[-1]) and alone_mask.shape == (3, 2 * per_window)
    for i, (row, slot, clip) in enumerate(clips):
        n, start = len(clip) * per_window, slot * 2 * per_window
        np.testing.assert_allclose(media[row, start:start + n], alone_media[i, :n], atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(media_mask[row, slot], alone_mask[i])


def test_one_audio_is_todays_single_audio_model(models, data, alone):
    """Row 1 (one audio in slot 0 of 2) gives the logits of today's single-audio model, mask on or off; an A = 1
    layout with the mask on is the single-audio text path bit for bit."""
    _, _, _, ids, mask, media, media_mask = data
    _, alone_media, alone_mask = alone  # row 2 is row 1's clip (1 window of 2)
    single_media, single_mask = alone_media[2:], alone_mask[2:]
    for model in models:
        single = text(model, single_media, single_mask, ids[1:], mask[1:])
        slotted = text(model, media, media_mask, ids, mask)[1:]
        np.testing.assert_allclose(slotted, single, atol=2e-5, rtol=1e-5)
        one_slot = text(model, single_media, single_mask[:, None], ids[1:], mask[1:])
        np.testing.assert_array_equal(one_slot, single)
        print(f"mask {model.config.media_location_mask}: slot 0 of 2 vs single audio, max |diff| = "
              f"{np.abs(slotted - single).max():.2e}")


def test_each_position_depends_only_on_the_audios_the_rule_allows(models, data):
    """Mask on: positions before the second <audio> (7) do not depend on audio 1 at all, positions from 7 on do,
    and text before the first <audio> (positions 0, 1) already sees audio 0 (AF1's rule). Mask off: every
    position depends on both."""
    off, on = models
    _, audio, audio_mask, ids, mask, media, media_mask = data
    other = audio.copy()
    other[0, 1, 0] = np.random.default_rng(99).uniform(-0.5, 0.5, SAMPLES)  # a different audio 1 in row 0
    other[0, 0, :2] = audio[0, 0, :2]
    first = audio.copy()
    first[0, 0, :2] = np.random.default_rng(98).uniform(-0.5, 0.5, (2, SAMPLES))  # a different audio 0
    base = text(on, media, media_mask, ids, mask)
    changed_second = text(on, *encode(on, other, audio_mask), ids, mask)
    changed_first = text(on, *encode(on, first, audio_mask), ids, mask)

    def moved(a, b):  # per position: how much the logits changed
        return np.abs(a - b).max(axis=-1)

    np.testing.assert_array_equal(changed_second[0, :7], base[0, :7])  # audio 1 invisible there: exactly
    assert moved(changed_second[0, 7:], base[0, 7:]).min() > 1e-4
    np.testing.assert_array_equal(changed_second[1], base[1])  # rows never see each other's audio
    assert moved(changed_first[0, :2], base[0, :2]).min() > 1e-4  # text before the first <audio> sees audio 0
    assert moved(changed_first[0, 7:], base[0, 7:]).min() > 1e-4  # and later text still does
    base_off = text(off, media, media_mask, ids, mask)
    changed_off = text(off, *encode(on, other, audio_mask), ids, mask)
    assert moved(changed_off[0, :7], base_off[0, :7]).min() > 1e-4  # off: every position sees every audio
    assert moved(base_off[0], base[0]).min() > 1e-4
    np.testing.assert_allclose(base_off[1], base[1], atol=1e-6, rtol=0)  # one audio: the mask changes nothing


def test_remat_and_unrolled_decoders_keep_the_mask(models, data):
    on = models[1]
    _, _, _, ids, mask, media, media_mask = data
    base = text(on, media, media_mask, ids, mask)
    for overrides in ({"remat_policy": "full"}, {"scan_unroll": True}):
        other = nnx.eval_shape(lambda o=overrides: AF2Model(dataclasses.replace(on.config, **o), rngs=nnx.Rngs(0)))
        nnx.update(other, nnx.state(on))
        np.testing.assert_allclose(text(other, media, media_mask, ids, mask), base, atol=1e-5, rtol=1e-5)


def test_gradients_flow_in_training_mode_and_stop_at_hidden_audio(models, data):
    """Training mode (HTSAT batch statistics, SpecAugment, fusion crop, drop path; audio-transformer dropout):
    the cross-attention and audio-transformer parameters get finite, nonzero gradients, and the loss of the
    predictions made before the second <audio> has an exactly zero gradient with respect to audio 1's tokens
    (a zero probe added to the media) and a nonzero one for audio 0's; the whole sequence's loss reaches both."""
    on = models[1]
    _, audio, audio_mask, ids, mask, media, _ = data
    trainable = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("xattn"), nnx.PathContains("audio_transformer")))
    graphdef, params, rest = nnx.split(on, trainable, ...)
    row = slice(0, 1)

    def loss(params, probe, upto, rest):
        # fresh Variables at this trace level: HTSAT's training mode updates its BatchStats in place
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
        rngs = nnx.Rngs(dropout=5)
        media, media_mask = model.encode_audio(jnp.asarray(audio[row]), jnp.asarray(audio_mask[row]),
                                               train_htsat=True, deterministic=False, rngs=rngs)
        logits, _ = model.text_logits(media_mask, jnp.asarray(ids[row]), jnp.asarray(mask[row]), media=media + probe)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(ids[row, 1:, None]), axis=-1)[..., 0]
        return jnp.sum(nll * (jnp.arange(nll.shape[1]) < upto))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    probe = jnp.zeros(media[row].shape)
    slot = media.shape[1] // 2
    p_early, m_early = grad(params, probe, jnp.int32(7), rest)  # predictions made at positions 0..6 (< 7)
    p_all, m_all = grad(params, probe, jnp.int32(11), rest)
    m_early, m_all = np.asarray(m_early), np.asarray(m_all)
    assert np.all(m_early[0, slot:] == 0.0) and np.abs(m_early[0, :slot]).max() > 0
    assert np.abs(m_all[0, slot:]).max() > 0 and np.abs(m_all[0, :slot]).max() > 0
    for grads in (p_early, p_all):
        leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
        assert all(np.all(np.isfinite(g)) for g in leaves)
        assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(nnx.to_pure_dict(grads["xattn"])))
    assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(p_all["audio_transformer"])) > 0
