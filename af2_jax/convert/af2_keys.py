"""The key table of NVIDIA's AF2 PyTorch state dict (`Flamingo.state_dict()`, the release's safetensors, the
AF-CLAP checkpoint's audio branch) <-> our parameter paths: one place for the whole format.

Composable builders, one per component, used in both directions by `mapping.import_tensors` / `export_tensors`:

    htsat_rules(config, prefix='clap.nvclap.', ours_prefix='')              AF2 safetensors / training checkpoints
    htsat_rules(config, prefix='')  + TorchFileSource(ckpt, select_prefix='module.audio_branch.')
                                                                            AF-CLAP checkpoint clap_ckpt/epoch_16.pt
    audio_transformer_rules(config, prefix='audio_transformer_clap.', ours_prefix='')
    xattn_rules(config, prefix, ours_prefix)                                one gated cross-attention block
    af2_rules(config)                                                       the whole AF2 model, aliases included

`ours_prefix` mounts our side under a submodule path (e.g. 'htsat/' inside the AF2 model). The reference's
structural buffers (Swin `relative_position_index`, shifted-window `attn_mask`, RoPE `position_enc.inv_freq`) are
`Derived`: recomputed with the reference's dtype and op order, checked bit for bit on import, written on export.
"""
from __future__ import annotations

import numpy as np

from af2_jax.convert.mapping import CONV2D, IDENTITY, LINEAR, Alias, Derived, Rule, Tensor, Transform
from af2_jax.convert.qwen2_hf import qwen2_layer_rules
from af2_jax.models import rope
from af2_jax.models.audio_transformer import AudioTransformerConfig
from af2_jax.models.htsat_config import HTSATConfig
from af2_jax.models.window_attention import relative_position_index, shift_attention_mask
from af2_jax.models.xattn import XAttnConfig

CLAP_PREFIX = "clap.nvclap."
AUDIO_TRANSFORMER_PREFIX = "audio_transformer_clap."
XATTN_PREFIX = "lang_encoder.model.layers.{i}.gated_cross_attn_layer_sound."
XATTN_ALIAS_PREFIX = "lang_encoder.gated_cross_attn_layers_sound.{i}."
DECODER_PREFIX = "lang_encoder.model.layers.{i}.decoder_layer."
DECODER_ALIAS_PREFIX = "lang_encoder.old_decoder_blocks.{i}."
EMBED_KEY = "lang_encoder.model.embed_tokens.weight"
LM_HEAD_KEY = "lang_encoder.lm_head.weight"

# torch BatchNorm's num_batches_tracked is int64; without jax x64 we hold it as int32 (far from overflowing).
INT_COUNTER = Transform("int64<->int32", lambda x: np.asarray(x).astype(np.int32),
                        lambda x: np.asarray(x).astype(np.int64))


def _batch_norm(ours: str, theirs: str) -> list[Rule]:
    return [Tensor(f"{ours}/scale", f"{theirs}.weight"), Tensor(f"{ours}/bias", f"{theirs}.bias"),
            Tensor(f"{ours}/mean", f"{theirs}.running_mean"), Tensor(f"{ours}/var", f"{theirs}.running_var"),
            Tensor(f"{ours}/num_batches_tracked", f"{theirs}.num_batches_tracked", INT_COUNTER)]


def _layer_norm(ours: str, theirs: str) -> list[Rule]:
    return [Tensor(f"{ours}/scale", f"{theirs}.weight"), Tensor(f"{ours}/bias", f"{theirs}.bias")]


def _dense(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    return [Tensor(f"{ours}/kernel", f"{theirs}.weight", LINEAR)] + (
        [Tensor(f"{ours}/bias", f"{theirs}.bias")] if bias else [])


def _conv(ours: str, theirs: str) -> list[Rule]:
    return [Tensor(f"{ours}/kernel", f"{theirs}.weight", CONV2D), Tensor(f"{ours}/bias", f"{theirs}.bias")]


def htsat_structural_buffers(config: HTSATConfig, prefix: str = "clap.nvclap.") -> dict[str, np.ndarray]:
    """The reference's recomputable HTSAT buffers under their keys: an int64 relative position index per block and
    a float32 0/-100 mask per shifted block (odd blocks of stages whose grid exceeds the window)."""
    out: dict[str, np.ndarray] = {}
    for s, depth in enumerate(config.depths):
        window, shift = config.stage_window(s), config.stage_shift(s)
        index = relative_position_index(window)
        mask = shift_attention_mask(config.stage_resolution(s), window, shift) if shift else None
        for j in range(depth):
            if j % 2 and mask is not None:
                out[f"{prefix}layers.{s}.blocks.{j}.attn_mask"] = mask
            out[f"{prefix}layers.{s}.blocks.{j}.attn.relative_position_index"] = index
    return out


def htsat_rules(config: HTSATConfig, prefix: str = "clap.nvclap.", ours_prefix: str = "") -> list[Rule]:
    """Every key of the reference HTSAT_Swin_Transformer state dict (fusion 'aff_2d' when config.enable_fusion)."""
    p, o = prefix, ours_prefix
    rules: list[Rule] = []
    rules += _batch_norm(f"{o}bn0", f"{p}bn0")
    rules += _conv(f"{o}patch_embed/proj", f"{p}patch_embed.proj")
    rules += _layer_norm(f"{o}patch_embed/norm", f"{p}patch_embed.norm")
    if config.enable_fusion:
        fm, tfm = f"{o}patch_embed/fusion_model", f"{p}patch_embed.fusion_model"
        rules += _conv(f"{o}patch_embed/mel_conv2d", f"{p}patch_embed.mel_conv2d")
        rules += _conv(f"{fm}/local_conv1", f"{tfm}.local_att.0") + _batch_norm(f"{fm}/local_bn1", f"{tfm}.local_att.1")
        rules += _conv(f"{fm}/local_conv2", f"{tfm}.local_att.3") + _batch_norm(f"{fm}/local_bn2", f"{tfm}.local_att.4")
        rules += _conv(f"{fm}/global_conv1", f"{tfm}.global_att.1") + _batch_norm(f"{fm}/global_bn1",
                                                                                  f"{tfm}.global_att.2")
        rules += _conv(f"{fm}/global_conv2", f"{tfm}.global_att.4") + _batch_norm(f"{fm}/global_bn2",
                                                                                  f"{tfm}.global_att.5")
    # {s} is in both names; {j} only in theirs, so it indexes the stacked 'layers' axis of our stage's blocks
    ob, tb = f"{o}stages/{{s}}/blocks", f"{p}layers.{{s}}.blocks.{{j}}"
    rules += _layer_norm(f"{ob}/norm1", f"{tb}.norm1") + _layer_norm(f"{ob}/norm2", f"{tb}.norm2")
    rules += _dense(f"{ob}/attn/qkv", f"{tb}.attn.qkv", bias=config.qkv_bias) + _dense(f"{ob}/attn/proj",
                                                                                       f"{tb}.attn.proj")
    rules.append(Tensor(f"{ob}/attn/relative_position_bias_table", f"{tb}.attn.relative_position_bias_table"))
    rules += _dense(f"{ob}/fc1", f"{tb}.mlp.fc1") + _dense(f"{ob}/fc2", f"{tb}.mlp.fc2")
    od, td = f"{o}stages/{{s}}/downsample", f"{p}layers.{{s}}.downsample"
    rules += _layer_norm(f"{od}/norm", f"{td}.norm") + _dense(f"{od}/reduction", f"{td}.reduction", bias=False)
    rules += _layer_norm(f"{o}norm", f"{p}norm")
    # unused by AF2, kept for exact round trips
    rules += _conv(f"{o}tscam_conv", f"{p}tscam_conv") + _dense(f"{o}head", f"{p}head")
    rules += [Tensor(f"{o}stft_real", f"{p}spectrogram_extractor.stft.conv_real.weight", IDENTITY),
              Tensor(f"{o}stft_imag", f"{p}spectrogram_extractor.stft.conv_imag.weight", IDENTITY),
              Tensor(f"{o}mel_filterbank", f"{p}logmel_extractor.melW", IDENTITY)]
    rules.append(Derived(lambda: htsat_structural_buffers(config, p)))
    return rules


def audio_transformer_inv_freq(config: AudioTransformerConfig) -> np.ndarray:
    """RotaryEmbedding's buffer: 1 / (base ** (arange(0, dim, 2).float() / dim)), all in float32 as torch does."""
    return rope.inv_freq(config.rotary_dim, config.rope_base)


def audio_transformer_rules(config: AudioTransformerConfig, prefix: str = "audio_transformer_clap.",
                            ours_prefix: str = "") -> list[Rule]:
    """Every key of the reference TransformerEncoder (RoPE variant) state dict."""
    p, o = prefix, ours_prefix
    ol, tl = f"{o}layers", f"{p}layer_stack.{{i}}"
    rules: list[Rule] = _layer_norm(f"{o}input_norm", f"{p}layer_norm")
    rules += [Tensor(f"{ol}/attention/query/kernel", f"{tl}.slf_attn.w_qs.weight", LINEAR),
              Tensor(f"{ol}/attention/key/kernel", f"{tl}.slf_attn.w_ks.weight", LINEAR),
              Tensor(f"{ol}/attention/value/kernel", f"{tl}.slf_attn.w_vs.weight", LINEAR),
              Tensor(f"{ol}/attention/out/kernel", f"{tl}.slf_attn.fc.weight", LINEAR)]
    rules += _layer_norm(f"{ol}/attention_norm", f"{tl}.slf_attn.layer_norm")
    rules += _dense(f"{ol}/ffn/w1", f"{tl}.pos_ffn.w_1") + _dense(f"{ol}/ffn/w2", f"{tl}.pos_ffn.w_2")
    rules += _layer_norm(f"{ol}/ffn_norm", f"{tl}.pos_ffn.layer_norm")
    rules.append(Derived(lambda: {f"{p}position_enc.inv_freq": audio_transformer_inv_freq(config)}))
    return rules


# -- the gated cross-attention and the whole model ----------------------------------------------------------

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
        Tensor(f"{o}attn_norm/scale", f"{p}attn.norm.weight", IDENTITY),
        Tensor(f"{o}attn_norm/bias", f"{p}attn.norm.bias", IDENTITY),
        Tensor(f"{o}to_q/kernel", f"{p}attn.to_q.weight", LINEAR),
        Tensor(f"{o}to_kv", f"{p}attn.to_kv.weight", _kv_transform(config)),
        Tensor(f"{o}to_out/kernel", f"{p}attn.to_out.weight", LINEAR),
        Tensor(f"{o}ff_norm/scale", f"{p}ff.0.weight", IDENTITY),
        Tensor(f"{o}ff_norm/bias", f"{p}ff.0.bias", IDENTITY),
        Tensor(f"{o}ff_in/kernel", f"{p}ff.1.weight", LINEAR),
        Tensor(f"{o}ff_out/kernel", f"{p}ff.3.weight", LINEAR),
    ]


def _aliases(rules: list[Rule], canonical_prefix: str, alias_prefix: str) -> list[Alias]:
    """One alias per tensor rule under `canonical_prefix`, re-rooted at `alias_prefix`."""
    return [Alias(alias_prefix + r.theirs[len(canonical_prefix):], same_as=r.theirs)
            for r in rules if isinstance(r, Tensor) and r.theirs.startswith(canonical_prefix)]


def af2_rules(config) -> list[Rule]:
    """The whole AF2 model's table: our flat paths <-> the reference `Flamingo.state_dict()` keys."""
    xattn = xattn_rules(config.xattn, XATTN_PREFIX, "xattn/")
    decoder = qwen2_layer_rules("llm/layers/", DECODER_PREFIX)
    rules: list[Rule] = [
        *htsat_rules(config.htsat, CLAP_PREFIX, "htsat/"),
        *audio_transformer_rules(config.audio_transformer, AUDIO_TRANSFORMER_PREFIX, "audio_transformer/"),
        *xattn, *_aliases(xattn, XATTN_PREFIX, XATTN_ALIAS_PREFIX),
        *decoder, *_aliases(decoder, DECODER_PREFIX, DECODER_ALIAS_PREFIX),
        Tensor("llm/embed_tokens/embedding", EMBED_KEY, IDENTITY),
        Tensor("llm/norm/scale", "lang_encoder.model.norm.weight", IDENTITY),
    ]
    if config.llm.tie_word_embeddings:
        rules.append(Alias(LM_HEAD_KEY, same_as=EMBED_KEY, export=True))  # the reference stores it as well
    else:
        rules.append(Tensor("llm/lm_head/kernel", LM_HEAD_KEY, LINEAR))
    return rules
