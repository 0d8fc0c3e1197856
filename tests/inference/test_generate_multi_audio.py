"""Cached generation with several audios per prompt and the media-location mask: prefill + decode steps equal the
full forward (no text cache) at every generated position, which AF1's decode step (new tokens see only the first
audio) does not; a batch mixing audio counts, window counts and prompt lengths gives each request exactly its own
tokens; a request with one audio is today's single-audio generation."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax.convert.af2_release import import_release
from af2_jax.inference.generate import (Request, encode_audio_kv, generate_tokens, left_pad, pad_audios,
                                       request_prompt_ids)
from af2_jax.inference.sampling import SamplingConfig
from af2_jax.models.af2 import AF2Model, init_cache
from af2_jax.param_tree import unflatten
from af2_jax.tokenizer import encode_prompt, train_tiny_tokenizer

STEPS = 6
SAMPLES = 160000
GREEDY = SamplingConfig(max_new_tokens=STEPS)


@pytest.fixture(scope="module")
def model(fixture_dir):
    """AF2's tiny reference weights (af2_tiny), HTSAT's third stage cut to 2 blocks (depths (2, 2, 2, 2)), gates
    scaled down as in test_generate, the media-location mask on."""
    config, params, _ = import_release(fixture_dir / "state_dict.safetensors", progress=False)
    config = dataclasses.replace(config, htsat=dataclasses.replace(config.htsat, depths=(2, 2, 2, 2)),
                                 media_location_mask=True)
    params = {k: v[:2] if k.startswith("htsat/stages/2/blocks/") else v for k, v in params.items()}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AF2Model(config, rngs=nnx.Rngs(0))))
    state.replace_by_pure_dict(unflatten({k: jnp.asarray(v) for k, v in params.items()}))
    model = nnx.merge(graphdef, state)
    model.xattn.attn_gate[...] = model.xattn.attn_gate[...] * 0.1
    model.xattn.ff_gate[...] = model.xattn.ff_gate[...] * 0.1
    return model


@pytest.fixture(scope="module")
def requests(model):
    """Request 0: two audios (2 windows, then 1), `<audio>` at 0 and 5; request 1: one audio of 1 window."""
    config = model.config
    rng = np.random.default_rng(21)
    a, sep = config.audio_token_id, config.sep_token_id
    audios = [[rng.uniform(-0.5, 0.5, (2, SAMPLES)).astype(np.float32),
               rng.uniform(-0.5, 0.5, (1, SAMPLES)).astype(np.float32)],
              [rng.uniform(-0.5, 0.5, (1, SAMPLES)).astype(np.float32)]]
    prompts = [[a, *rng.integers(0, 290, 4), a, *rng.integers(0, 290, 3), sep],
               [a, *rng.integers(0, 290, 5), sep]]
    return audios, [list(map(int, p)) for p in prompts]


def _until_eos(row, eos_id):
    row = list(map(int, row))
    return row[:row.index(eos_id) + 1] if eos_id in row else row


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, state, audio_kv, media_mask, ids, mask):
    return nnx.merge(graphdef, state).text_logits(media_mask, ids, mask, audio_kv=audio_kv)[0]


@functools.partial(jax.jit, static_argnums=0)
def _cached_logits(graphdef, state, audio_kv, media_mask, ids, mask, forced, af1_bug):
    """Prefill, then one decode step per forced token: the logits before each (len(forced) + 1, V). `af1_bug`
    forgets the prompt's <audio> count after the prefill, which is what AF1's decode step amounts to."""
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, 1, ids.shape[1] + forced.shape[0])
    logits, cache = model.prefill(audio_kv, media_mask, ids, mask, cache)
    cache = dataclasses.replace(cache, audio_seen=jnp.where(af1_bug, 0, cache.audio_seen))
    out = [logits[0]]
    for token in forced:
        logits, cache = model.decode_step(token[None], audio_kv, media_mask, cache)
        out.append(logits[0])
    return jnp.stack(out)


def test_decode_steps_equal_the_full_forward_unlike_af1(model, requests):
    """Request 0 (two audios): greedy tokens from a plain loop re-running the whole sequence without any cache;
    generate_tokens gives the same tokens, and the cached logits equal the full forward's at every generated
    position. AF1's decode step (the new token sees only the first audio) gives different logits."""
    config = model.config
    audios, prompts = requests
    audio, audio_mask = pad_audios([audios[0]])
    audio_kv, media_mask = encode_audio_kv(model, audio, audio_mask)
    graphdef, state = nnx.split(model)
    prompt = prompts[0]
    width = 16 + STEPS
    ids = np.full((1, width), config.pad_token_id, np.int32)
    mask = np.zeros((1, width), np.int32)
    ids[0, :len(prompt)], mask[0, :len(prompt)] = prompt, 1
    tokens, full = [], []
    for t in range(len(prompt), len(prompt) + STEPS):
        logits = np.asarray(_full_logits(graphdef, state, audio_kv, media_mask, jnp.asarray(ids), jnp.asarray(mask)))
        full.append(logits[0, t - 1])
        tokens.append(int(np.argmax(logits[0, t - 1])))
        ids[0, t], mask[0, t] = tokens[-1], 1
    generated = generate_tokens(model, audio, audio_mask, *left_pad([prompt], config.pad_token_id), GREEDY)
    assert _until_eos(generated[0], config.eos_token_id) == _until_eos(tokens, config.eos_token_id)
    assert len(set(tokens)) > 1

    prompt_ids, prompt_mask = left_pad([prompt], config.pad_token_id)
    args = (graphdef, state, audio_kv, media_mask, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask),
            jnp.asarray(tokens[:-1], jnp.int32))
    cached = np.asarray(_cached_logits(*args, jnp.asarray(False)))
    np.testing.assert_allclose(cached, np.stack(full), atol=2e-5, rtol=1e-5)
    af1 = np.asarray(_cached_logits(*args, jnp.asarray(True)))
    np.testing.assert_allclose(af1[0], full[0], atol=2e-5, rtol=1e-5)  # the prefill is right in AF1 too
    bug = np.abs(af1[1:] - np.stack(full[1:])).max(axis=-1)
    print(f"cached vs full forward: max |diff| = {np.abs(cached - np.stack(full)).max():.2e}; "
          f"AF1's decode step vs full forward, per step: {np.array2string(bug, precision=3)}")
    assert bug.min() > 1e-3


def test_batch_gives_each_request_what_it_gets_alone(model, requests):
    """A batch padding both the audio slots and each audio's windows (2 slots x 2 windows) and the prompts: each
    row equals that request generated alone; the one-audio request equals today's single-audio generation."""
    config = model.config
    audios, prompts = requests
    audio, audio_mask = pad_audios(audios)
    assert audio.shape == (2, 2, 2, SAMPLES)
    np.testing.assert_array_equal(audio_mask, [[[1, 1], [1, 0]], [[1, 0], [0, 0]]])
    ids, mask = left_pad(prompts, config.pad_token_id)
    batch = generate_tokens(model, audio, audio_mask, ids, mask, GREEDY, data_parallel=False)
    first = generate_tokens(model, *pad_audios([audios[0]]), *left_pad([prompts[0]], config.pad_token_id), GREEDY,
                            data_parallel=False)
    single = generate_tokens(model, audios[1][0][None], np.ones((1, 1)), *left_pad([prompts[1]], config.pad_token_id),
                             GREEDY, data_parallel=False)  # today's single-audio API
    one_slot = generate_tokens(model, *pad_audios([audios[1]]), *left_pad([prompts[1]], config.pad_token_id),
                               GREEDY, data_parallel=False)  # the multi-audio layout with A = 1
    eos = config.eos_token_id
    assert _until_eos(batch[0], eos) == _until_eos(first[0], eos)
    assert _until_eos(batch[1], eos) == _until_eos(single[0], eos)
    np.testing.assert_array_equal(one_slot, single)
    assert _until_eos(batch[0], eos) != _until_eos(batch[1], eos)


def test_requests_name_one_audio_token_per_audio():
    """Request's multi-audio shape and prompt checks (the tokenizer side of answer_batch)."""
    tok = train_tiny_tokenizer(["a dog barks", "which one barks?"], vocab_size=300)
    one = np.zeros((1, SAMPLES), np.float32)
    today = encode_prompt(tok, "Which one barks?")
    assert request_prompt_ids(tok, Request(one, "Which one barks?")) == today
    assert request_prompt_ids(tok, Request([one], "Which one barks?")) == today  # a list of one, no <audio>
    two = request_prompt_ids(tok, Request([one, one], "<audio>A dog. <audio>Which one barks?"))
    assert two.count(tok.audio_id) == 2 and two[0] == tok.audio_id and two[-1] == tok.sep_id
    assert two == tok.encode("<audio>a dog. <audio>which one barks?<SEP>")
    with pytest.raises(ValueError, match="one <audio> per audio"):
        request_prompt_ids(tok, Request([one, one], "A dog. <audio>Which one barks?"))
    with pytest.raises(ValueError, match="found 1"):  # truncation cut the second <audio>
        request_prompt_ids(tok, Request([one, one], "<audio>a dog barks a dog barks <audio>?"), max_prompt_tokens=4)
    assert Request(one, "q").audios[0] is one and not Request(one, "q").multi_audio
    assert Request([one, one], "q").multi_audio and len(Request([one, one], "q").audios) == 2
    with pytest.raises(ValueError, match="at least one audio"):
        pad_audios([[one], []])
    audio, mask = pad_audios([[one], [one, np.zeros((2, SAMPLES), np.float32)]], num_audios=3)
    assert audio.shape == (2, 3, 2, SAMPLES)
    np.testing.assert_array_equal(mask, [[[1, 0], [0, 0], [0, 0]], [[1, 0], [1, 1], [0, 0]]])
