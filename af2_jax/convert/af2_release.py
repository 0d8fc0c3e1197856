"""NVIDIA's AF2 PyTorch release <-> our AF2Model: the whole-model key table, the release directory layout, and the
tokenizer import.

This file starts with the cross-attention rules; the whole-model table is composed below them.
"""
from __future__ import annotations

import numpy as np

from af2_jax.convert.mapping import IDENTITY, LINEAR, Rule, Tensor, Transform
from af2_jax.models.xattn import XAttnConfig


def _kv_transform(config: XAttnConfig) -> Transform:
    """torch to_kv.weight (2*inner, dim_audio) holding [k | v] rows <-> our (dim_audio, 2, inner)."""
    inner, dim_audio = config.inner_dim, config.dim_audio
    return Transform(
        "to_kv",
        lambda w: np.ascontiguousarray(w.T).reshape(dim_audio, 2, inner),
        lambda k: np.ascontiguousarray(k.reshape(dim_audio, 2 * inner).T))


def xattn_rules(config: XAttnConfig, prefix: str, ours_prefix: str) -> list[Rule]:
    """Rules for one gated cross-attention block (or a stack of them, when `prefix` holds a `{i}` placeholder that
    `ours_prefix` lacks). `prefix` ends with '.', `ours_prefix` with '/' (or is empty)."""
    p, o = prefix, ours_prefix
    return [
        Tensor(f"{o}attn_gate", f"{p}attn_gate", IDENTITY),
        Tensor(f"{o}ff_gate", f"{p}ff_gate", IDENTITY),
        Tensor(f"{o}attn_norm_scale", f"{p}attn.norm.weight", IDENTITY),
        Tensor(f"{o}attn_norm_bias", f"{p}attn.norm.bias", IDENTITY),
        Tensor(f"{o}to_q", f"{p}attn.to_q.weight", LINEAR),
        Tensor(f"{o}to_kv", f"{p}attn.to_kv.weight", _kv_transform(config)),
        Tensor(f"{o}to_out", f"{p}attn.to_out.weight", LINEAR),
        Tensor(f"{o}ff_norm_scale", f"{p}ff.0.weight", IDENTITY),
        Tensor(f"{o}ff_norm_bias", f"{p}ff.0.bias", IDENTITY),
        Tensor(f"{o}ff_in", f"{p}ff.1.weight", LINEAR),
        Tensor(f"{o}ff_out", f"{p}ff.3.weight", LINEAR),
    ]
