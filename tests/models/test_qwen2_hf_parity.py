"""Our Qwen2 against transformers' PyTorch Qwen2ForCausalLM: logits on left-padded batches and greedy generation
through our KV cache, for three tiny random configs converted with import_hf."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import af2_jax  # noqa: F401
from af2_jax.param_tree import unflatten
from af2_jax.convert.qwen2_hf import import_hf
from af2_jax.models.qwen2 import Qwen2ForCausalLM, init_cache
from tests.models.qwen2_reference import HF_CONFIGS, hf_position_ids, left_padded_batch, make_hf_qwen2

NEW_TOKENS = 32


def build_model(config, params) -> Qwen2ForCausalLM:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))))
    state.replace_by_pure_dict(unflatten({k: jnp.asarray(v) for k, v in params.items()}))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our converted model) for one config."""
    hf_model = make_hf_qwen2(request.param, seed=sorted(HF_CONFIGS).index(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    config, params = import_hf(directory, progress=False)
    return hf_model, build_model(config, params)


def test_logits_match_transformers_on_left_padded_batch(pair):
    import torch

    hf_model, model = pair
    ids, mask = left_padded_batch(hf_model.config.vocab_size, [13, 9, 4], seed=1)
    with torch.no_grad():
        # transformers' forward uses arange positions unless told; give it generate()'s left-padding positions
        ref = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       position_ids=torch.from_numpy(hf_position_ids(mask))).logits.numpy()
    ours, cache = model(jnp.asarray(ids), jnp.asarray(mask))  # positions derived from the mask by our code
    assert cache is None
    assert ours.dtype == jnp.float32
    real = mask.astype(bool)
    diff = np.abs(np.asarray(ours)[real] - ref[real]).max()
    scale = np.abs(ref[real]).max()
    print(f"max|diff| {diff:.3g}, max|ref| {scale:.3g}, ratio {diff / scale:.3g}")
    assert diff <= 1e-4 * scale


def greedy_generate(model: Qwen2ForCausalLM, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Prefill the cache with the left-padded prompt, then jitted single-token decode steps (argmax)."""
    graphdef, state = nnx.split(model)
    cache = init_cache(model.config, ids.shape[0], ids.shape[1] + new_tokens)

    @jax.jit
    def forward(state, cache, tokens, token_mask):
        logits, cache = nnx.merge(graphdef, state)(tokens, token_mask, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    token, cache = forward(state, cache, jnp.asarray(ids), jnp.asarray(mask))
    generated = [token]
    ones = jnp.ones((ids.shape[0], 1), jnp.int32)
    for _ in range(new_tokens - 1):
        token, cache = forward(state, cache, token[:, None], ones)
        generated.append(token)
    assert int(cache.index) == ids.shape[1] + new_tokens - 1
    return np.stack([np.asarray(t) for t in generated], axis=1)


def test_greedy_generation_matches_transformers_generate(pair):
    import torch

    hf_model, model = pair
    ids, mask = left_padded_batch(hf_model.config.vocab_size, [11, 6, 8], seed=2)
    with torch.no_grad():
        ref = hf_model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                eos_token_id=None, pad_token_id=0).numpy()[:, ids.shape[1]:]
    assert ref.shape == (3, NEW_TOKENS)
    ours = greedy_generate(model, ids, mask, NEW_TOKENS)
    np.testing.assert_array_equal(ours, ref)
