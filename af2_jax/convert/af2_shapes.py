"""The AF2 config that a reference state dict's shapes imply, so that any checkpoint converts, not only the
published sizes.

Read from the shapes (keys of `af2_release.af2_rules`):
  HTSAT        embed_dim, depths, heads per stage (relative-position tables), window, patch size, mel bins,
               classes, fusion branch present, MLP ratio, qkv bias, STFT size
  audio        d_model, layers, d_inner, and d_k from the RoPE buffer `position_enc.inv_freq` (rotary_dim / 2
  transformer  values, rotary_dim = max(d_k / 2, 32)) whenever it says more than "d_k <= 64"
  LLM          vocabulary, hidden, intermediate, layers, q and k/v widths, output head tied or not (values)
  xattn        heads (the reference's dim_head is fixed at 64), the FF multiplier

Not in any shape: the LLM's head count (q width = heads x head_dim), the audio transformer's when d_k <= 64, RoPE
theta, norm epsilons, max_windows. These come from the AF2 preset whose widths match, else from `overrides`
({'llm.num_heads': 16}); a head count neither gives is an error naming the override. Special-token ids follow the
reference's layout (AF2's four tokens are the vocabulary's last four rows); a converter given a tokenizer replaces
them with its ids.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from af2_jax.models.af2 import AF2_PRESETS, AF2Config, af2_preset
from af2_jax.models.xattn import XAttnConfig

QWEN_EOS_ID = 151643  # <|endoftext|> in Qwen2.5's vocabulary
XATTN_DIM_HEAD = 64  # fixed in the reference's GatedCrossAttentionBlock
CLAP, AUDIO, LLM = "clap.nvclap.", "audio_transformer_clap.", "lang_encoder."
XATTN = "lang_encoder.model.layers.0.gated_cross_attn_layer_sound."


class ShapeError(ValueError):
    """A state dict whose shapes do not determine an AF2 config (a missing key, or a field to pass)."""


class Shapes:
    """The source's keys and shapes, read from headers (no tensor is loaded)."""

    def __init__(self, source):
        self.source, self.keys = source, source.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __call__(self, key: str) -> tuple[int, ...]:
        if key not in self.keys:
            raise ShapeError(f"the checkpoint has no {key!r}, which fixes a size of the model")
        return tuple(self.source.shape(key))

    def count(self, pattern: str) -> int:
        found = {int(m.group(1)) for k in self.keys if (m := re.match(pattern, k))}
        return max(found) + 1 if found else 0


def _htsat(shape: Shapes, p: str = CLAP) -> dict:
    embed, _, patch, _ = shape(f"{p}patch_embed.proj.weight")
    stages = shape.count(rf"{re.escape(p)}layers\.(\d+)\.")
    block = f"{p}layers.{{s}}.blocks.0.attn.relative_position_bias_table"
    return dict(embed_dim=embed, patch_size=patch, patch_stride=patch, mel_bins=shape(f"{p}bn0.weight")[0],
                depths=tuple(shape.count(rf"{re.escape(p)}layers\.{s}\.blocks\.(\d+)\.") for s in range(stages)),
                num_heads=tuple(shape(block.format(s=s))[1] for s in range(stages)),
                window_size=(round(shape(block.format(s=0))[0] ** 0.5) + 1) // 2,  # (2 window - 1)^2 rows
                mlp_ratio=shape(f"{p}layers.0.blocks.0.mlp.fc1.weight")[0] / embed,
                qkv_bias=f"{p}layers.0.blocks.0.attn.qkv.bias" in shape,
                num_classes=shape(f"{p}head.weight")[0], enable_fusion=f"{p}patch_embed.mel_conv2d.weight" in shape,
                n_fft=shape(f"{p}spectrogram_extractor.stft.conv_real.weight")[2])


def htsat_fields(source, prefix: str = CLAP) -> dict:
    """The HTSATConfig fields that the shapes of `source`'s keys under `prefix` fix (AF2's 'clap.nvclap.', an
    AF-CLAP checkpoint's 'module.audio_branch.'); no shape holds the others (spec_size, eps, drop_path_rate...)."""
    return _htsat(source if isinstance(source, Shapes) else Shapes(source), prefix)


def _audio_transformer(shape: Shapes, p: str = AUDIO) -> tuple[dict, int]:
    fields = dict(d_model=shape(f"{p}layer_norm.weight")[0],
                  n_layers=shape.count(rf"{re.escape(p)}layer_stack\.(\d+)\."),
                  d_inner=shape(f"{p}layer_stack.0.pos_ffn.w_1.weight")[0])
    inner = shape(f"{p}layer_stack.0.slf_attn.w_qs.weight")[0]
    if f"{p}position_enc.inv_freq" in shape and 2 * shape(f"{p}position_enc.inv_freq")[0] > 32:
        d_k = 4 * shape(f"{p}position_enc.inv_freq")[0]
        fields.update(d_k=d_k, n_heads=inner // d_k)
    return fields, inner


def _llm(shape: Shapes, p: str = LLM) -> tuple[dict, int, int]:
    vocab, hidden = shape(f"{p}model.embed_tokens.weight")
    layer = f"{p}model.layers.0.decoder_layer."
    q, k = shape(f"{layer}self_attn.q_proj.weight")[0], shape(f"{layer}self_attn.k_proj.weight")[0]
    if q % k:
        raise ShapeError(f"q_proj width {q} is not a multiple of k_proj width {k}")
    head = f"{p}lm_head.weight"
    # the reference writes the tied head too: only its values tell a tied head from a trained one
    embed = f"{p}model.embed_tokens.weight"
    tied = head not in shape or np.array_equal(shape.source.get(head), shape.source.get(embed))
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=shape(f"{layer}mlp.gate_proj.weight")[0],
                num_layers=shape.count(rf"{re.escape(p)}model\.layers\.(\d+)\.decoder_layer\."),
                tie_word_embeddings=bool(tied)), q, k


def _xattn(shape: Shapes, p: str = XATTN) -> dict:
    inner, dim = shape(f"{p}attn.to_q.weight")
    if inner % XATTN_DIM_HEAD:
        raise ShapeError(f"cross-attention width {inner} is not a multiple of the reference's dim_head 64")
    return dict(heads=inner // XATTN_DIM_HEAD, dim_head=XATTN_DIM_HEAD, ff_mult=shape(f"{p}ff.1.weight")[0] // dim)


def _matching_preset(htsat: dict, at: dict, llm: dict, q: int, k: int) -> str | None:
    """The preset whose widths are these: its head counts and non-shape fields then apply."""
    for name in AF2_PRESETS:
        c = af2_preset(name)
        if ((c.llm.hidden_size, c.llm.num_heads * c.llm.head_dim, c.llm.num_kv_heads * c.llm.head_dim,
             c.audio_transformer.d_model, c.htsat.embed_dim)
                == (llm["hidden_size"], q, k, at["d_model"], htsat["embed_dim"])):
            return name
    return None


def infer_config(source, *, overrides: Mapping[str, Any] | None = None, **af2_fields) -> tuple[AF2Config, str | None]:
    """(AF2Config, the preset whose widths match or None) from a tensor source (keys(), shape(), get()).
    `overrides` set sub-config fields ({'llm.num_heads': 16, 'audio_transformer.n_heads': 2}); `af2_fields` are
    AF2Config's own (max_windows, ...) plus `dtype`/`param_dtype` for every sub-config."""
    shape = Shapes(source)
    htsat, (at, at_inner), (llm, q, k), xattn = _htsat(shape), _audio_transformer(shape), _llm(shape), _xattn(shape)
    preset = _matching_preset(htsat, at, llm, q, k)
    base = af2_preset(preset or "3b")  # otherwise Qwen2.5's RoPE theta and epsilons, 30 windows
    if preset is not None:
        llm.update(num_heads=base.llm.num_heads, num_kv_heads=base.llm.num_kv_heads, head_dim=base.llm.head_dim)
        at.setdefault("n_heads", base.audio_transformer.n_heads)
    fields = {"htsat": htsat, "audio_transformer": at, "llm": llm, "xattn": xattn}
    for dotted, value in (overrides or {}).items():
        part, _, name = dotted.partition(".")
        if part not in fields or not name:
            raise ShapeError(f"override {dotted!r}: expected one of {sorted(fields)}, a dot, then a field name")
        fields[part][name] = value
    if "num_heads" not in llm:
        raise ShapeError(f"the LLM's head count is not in the checkpoint's shapes (queries {q} wide, keys {k}) and "
                         f"no preset has these widths: pass it, e.g. --set llm.num_heads={q // 64} (64-wide heads)")
    if "n_heads" not in at:
        raise ShapeError(f"the audio transformer's head count is not in the checkpoint's shapes (attention "
                         f"{at_inner} wide, d_k <= 64): pass it, e.g. --set audio_transformer.n_heads=2")
    llm.setdefault("head_dim", q // llm["num_heads"])
    llm.setdefault("num_kv_heads", k // llm["head_dim"])
    at.setdefault("d_k", at_inner // at["n_heads"])
    dtypes = {name: af2_fields.pop(name) for name in ("dtype", "param_dtype") if name in af2_fields}
    vocab = llm["vocab_size"]
    ids = dict(audio_token_id=vocab - 4, eoc_token_id=vocab - 3, pad_token_id=vocab - 2, sep_token_id=vocab - 1,
               eos_token_id=QWEN_EOS_ID if vocab > QWEN_EOS_ID + 4 else vocab - 5)
    config = AF2Config(
        htsat=dataclasses.replace(base.htsat, **htsat, **dtypes),
        audio_transformer=dataclasses.replace(base.audio_transformer, **at, **dtypes),
        llm=dataclasses.replace(base.llm, **llm, **dtypes),
        xattn=XAttnConfig(dim=llm["hidden_size"], dim_audio=at["d_model"], **xattn, **dtypes),
        **{"max_windows": base.max_windows, **ids, **af2_fields})
    return config, preset
