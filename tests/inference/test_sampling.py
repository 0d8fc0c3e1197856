"""Next-token choice against Hugging Face's PyTorch logits warpers (the reference's generate uses them)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from af2_jax.inference.sampling import SamplingConfig, filter_logits, next_token


def _hf_filter(logits: np.ndarray, temperature, top_k, top_p) -> np.ndarray:
    scores = torch.from_numpy(logits.copy())
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 30, 0.95), (0.7, 0, 0.8), (1.3, 5, 1.0), (1.0, 0, 0.5)])
def test_filters_keep_the_same_candidates_as_transformers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(scale=3.0, size=(4, 300)).astype(np.float32)
    ours = np.asarray(filter_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    ref = _hf_filter(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    kept = ~np.isinf(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)
    assert kept.sum(-1).min() >= 1


def test_greedy_is_argmax_and_sampling_stays_in_the_candidate_set():
    logits = jnp.asarray(np.random.default_rng(1).normal(scale=2.0, size=(3, 50)), jnp.float32)
    greedy = next_token(logits, jax.random.key(0), SamplingConfig())
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
    config = SamplingConfig(temperature=1.0, top_k=4, top_p=0.9)
    allowed = ~np.isinf(_hf_filter(np.asarray(logits), 1.0, 4, 0.9))
    draws = jax.vmap(lambda k: next_token(logits, k, config))(jax.random.split(jax.random.key(1), 200))
    for row in range(3):
        assert allowed[row, np.asarray(draws[:, row])].all()
    # a fixed key reproduces the same draw
    key = jax.random.key(5)
    np.testing.assert_array_equal(next_token(logits, key, config), next_token(logits, key, config))


def test_bad_settings_are_rejected():
    for kwargs in ({"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingConfig(**kwargs)
