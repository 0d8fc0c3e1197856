"""Tiny random transformers `Qwen2ForCausalLM` models (the independent PyTorch reference) for the Qwen2 tests.

HF's own init (normal 0.02) gives near-uniform logits that would hide mistakes, so every tensor is redrawn at a
scale that makes each part matter: norm weights 1 + 0.2 N, biases 0.1 N, embeddings 0.5 N, matrices N / sqrt(fan_in).
"""
from __future__ import annotations

import numpy as np

# three configs that differ in GQA ratio, tied vs untied head, RoPE theta, vocab size (and head_dim != hidden/heads)
HF_CONFIGS = {
    "gqa2_tied": dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),
    "mha_untied": dict(vocab_size=257, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4, tie_word_embeddings=False),
    "gqa6_headdim": dict(vocab_size=411, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=1, head_dim=24, rope_theta=5e5,
                         tie_word_embeddings=True),
}


def make_hf_qwen2(name: str, seed: int = 0):
    import torch
    import transformers

    config = transformers.Qwen2Config(**HF_CONFIGS[name], rms_norm_eps=1e-6, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if key.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif key.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in key:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[1]))
    return model


def left_padded_batch(vocab_size: int, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids (B, max(lengths)) left-padded with token 0, and the (B, T) int attention mask."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.integers(1, vocab_size, n)
        mask[row, width - n:] = 1
    return ids, mask


def hf_position_ids(mask: np.ndarray) -> np.ndarray:
    """transformers' generate(): cumsum(mask) - 1, padding filled with 1 (written here independently of ours)."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 1, positions, 1)
