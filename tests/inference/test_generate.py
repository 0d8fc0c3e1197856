"""Batched cached generation against a plain reference loop (full forward without any cache, argmax, one sample
at a time): a batch mixing audio and prompt lengths must give each sample exactly its own tokens."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax.inference.generate import data_parallel_mesh, encode_audio_kv, generate_tokens, left_pad
from af2_jax.inference.sampling import SamplingConfig
from af2_jax.convert.af2_release import import_release
from af2_jax.param_tree import unflatten
from af2_jax.models.af2 import AF2Model

STEPS = 6


@pytest.fixture(scope="module")
def model(fixture_dir):
    """The reference's tiny random AF2 (nonzero gates, sharp logits), gates scaled down so that greedy answers
    depend on the prompt and do not collapse onto one token."""
    config, params, _ = import_release(fixture_dir / "state_dict.safetensors", progress=False)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AF2Model(config, rngs=nnx.Rngs(0))))
    state.replace_by_pure_dict(unflatten({k: jnp.asarray(v) for k, v in params.items()}))
    model = nnx.merge(graphdef, state)
    model.xattn.attn_gate[...] = model.xattn.attn_gate[...] * 0.1
    model.xattn.ff_gate[...] = model.xattn.ff_gate[...] * 0.1
    assert np.all(np.abs(model.xattn.attn_gate[...]) > 0.03)
    return model


@pytest.fixture(scope="module")
def batch(model):
    """Three samples mixing audio lengths (1, 2, 1 windows) and prompt lengths (5, 11, 7 tokens)."""
    config = model.config
    rng = np.random.default_rng(5)  # a draw whose greedy answers are not one repeated token
    windows = [rng.uniform(-0.5, 0.5, size=(n, 160000)).astype(np.float32) for n in (1, 2, 1)]
    prompts = [[config.audio_token_id, *rng.integers(0, 290, size=n), config.sep_token_id] for n in (3, 9, 5)]
    audio = np.zeros((3, 2, 160000), np.float32)
    audio_mask = np.zeros((3, 2), np.float32)
    for row, w in enumerate(windows):
        audio[row, :len(w)], audio_mask[row, :len(w)] = w, 1
    ids, mask = left_pad(prompts, config.pad_token_id)
    return windows, prompts, audio, audio_mask, ids, mask


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, state, audio_kv, media_mask, ids, mask):
    model = nnx.merge(graphdef, state)
    return model.text_logits(media_mask, ids, mask, audio_kv=audio_kv)[0]


def _reference_greedy(model, windows, prompt, steps, eos_id):
    """No text cache, no batching: re-run the whole (right-padded, fixed-width) sequence for every new token."""
    audio_kv, media_mask = encode_audio_kv(model, windows[None], np.ones((1, len(windows))))
    graphdef, state = nnx.split(model)
    width = 16 + steps  # one compiled shape for every prompt
    ids = np.full((1, width), model.config.pad_token_id, np.int32)
    mask = np.zeros((1, width), np.int32)
    ids[0, :len(prompt)], mask[0, :len(prompt)] = prompt, 1
    out = []
    for t in range(len(prompt), len(prompt) + steps):
        logits = _full_logits(graphdef, state, audio_kv, media_mask, jnp.asarray(ids), jnp.asarray(mask))
        token = int(np.argmax(np.asarray(logits[0, t - 1])))
        out.append(token)
        if token == eos_id:
            break
        ids[0, t], mask[0, t] = token, 1
    return out


def _until_eos(row, eos_id):
    row = list(map(int, row))
    return row[:row.index(eos_id) + 1] if eos_id in row else row


@pytest.mark.slow
def test_batch_gives_each_sample_what_it_gets_alone(model, batch):
    config = model.config
    windows, prompts, audio, audio_mask, ids, mask = batch
    greedy = SamplingConfig(max_new_tokens=STEPS)
    tokens = generate_tokens(model, audio, audio_mask, ids, mask, greedy)
    assert tokens.shape == (3, STEPS)
    # four rows (the third repeated) are split over four of the eight test devices, one row each
    assert data_parallel_mesh(4).devices.size == 4
    rows = [0, 1, 2, 2]
    split = generate_tokens(model, audio[rows], audio_mask[rows], ids[rows], mask[rows], greedy)
    for row in range(3):
        reference = _reference_greedy(model, windows[row], prompts[row], STEPS, config.eos_token_id)
        alone = generate_tokens(model, windows[row][None], np.ones((1, len(windows[row]))),
                                *left_pad([prompts[row]], config.pad_token_id), greedy)[0]
        assert _until_eos(tokens[row], config.eos_token_id) == reference, row
        assert _until_eos(alone, config.eos_token_id) == reference, row
        assert _until_eos(split[row], config.eos_token_id) == reference, row
    assert _until_eos(split[3], config.eos_token_id) == _until_eos(tokens[2], config.eos_token_id)
    # the test means something: rows differ, and answers are not one repeated token
    assert len({tuple(r) for r in tokens}) == 3
    assert all(len(set(r)) > 1 for r in tokens)


def test_rows_stop_at_eos_and_pad_after(model, batch):
    """Declaring the token that row 0 emits second to be eos: row 0 stops right there, and every row is padding
    after its first eos."""
    config = model.config
    _, _, audio, audio_mask, ids, mask = batch
    greedy = SamplingConfig(max_new_tokens=STEPS)
    free = generate_tokens(model, audio, audio_mask, ids, mask, greedy)
    stop = int(free[0, 1])
    tokens = generate_tokens(model, audio, audio_mask, ids, mask, greedy, eos_id=stop)
    for row, free_row in zip(tokens, free):
        free_row = list(map(int, free_row))
        cut = free_row.index(stop) + 1 if stop in free_row else STEPS
        assert list(row[:cut]) == free_row[:cut]
        assert (row[cut:] == config.pad_token_id).all()
    assert (tokens[0, 2:] == config.pad_token_id).all()


def test_sampling_is_seeded_and_top_k_1_is_greedy(model, batch):
    _, _, audio, audio_mask, ids, mask = batch
    greedy = generate_tokens(model, audio, audio_mask, ids, mask, SamplingConfig(max_new_tokens=STEPS))
    top1 = generate_tokens(model, audio, audio_mask, ids, mask,
                           SamplingConfig(temperature=1.0, top_k=1, max_new_tokens=STEPS, seed=1))
    np.testing.assert_array_equal(top1, greedy)
    sampled = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=STEPS, seed=2)
    first = generate_tokens(model, audio, audio_mask, ids, mask, sampled)
    np.testing.assert_array_equal(first, generate_tokens(model, audio, audio_mask, ids, mask, sampled))
    assert not np.array_equal(first, greedy)  # a hot temperature over 50 candidates leaves the greedy path


def test_right_padded_prompts_are_rejected(model):
    with pytest.raises(ValueError, match="LEFT"):
        generate_tokens(model, np.zeros((1, 1, 160000), np.float32), np.ones((1, 1)), np.array([[5, 6, 0]]),
                        np.array([[1, 1, 0]]), SamplingConfig(max_new_tokens=2))


def test_data_parallel_mesh_splits_rows_evenly():
    """Generation splits a batch over the most devices that divide it (the tests simulate 8)."""
    assert jax.local_device_count() == 8
    assert data_parallel_mesh(3) is None
    assert data_parallel_mesh(6).shape == {"data": 2, "fsdp": 1, "tensor": 1}
    assert data_parallel_mesh(16).devices.size == 8
