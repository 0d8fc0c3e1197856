"""The key table of NVIDIA's AF-CLAP checkpoint (`clap_ckpt/epoch_16.pt['state_dict']`, the `CLAP` model of
`amodel='HTSAT-afclap', tmodel='t5'` behind a DDP wrapper, afclap_reference.md section 6) <-> our AFCLAPModel's
parameter paths, used in both directions by `mapping.import_tensors` / `export_tensors`:

    logit_scale_a / logit_scale_t                        logit_scale_a / logit_scale_t (0-d)
    audio_branch.*                                       htsat/*   (af2_keys.htsat_rules: AF2's table of the same
                                                                    HTSAT, so the audio half maps as AF2's does)
    text_branch.shared.weight                            t5/embed_tokens
    text_branch.encoder.embed_tokens.weight              Alias of shared (T5 ties them; NVIDIA's strict loader
                                                         needs both names, so export writes it)
    text_branch.encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight    t5/layers/attention/{query,...}/kernel
    text_branch.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   t5/relative_attention_bias
    text_branch.encoder.block.{i}.layer.{0,1}.layer_norm.weight             t5/layers/{attention,ff}_norm/scale
    text_branch.encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight    t5/layers/ff/*/kernel
    text_branch.encoder.final_layer_norm.weight          t5/final_norm/scale
    {audio,text}_projection.{0,2}.*                      {audio,text}_projection/fc{1,2}/*   (index 1 is the ReLU)
    {audio,text}_transform.sequential.{0,3}.*            {audio,text}_transform/fc{1,2}/*   (1 ReLU, 2 Dropout)

`{i}` is T5's stacked 'layers' axis. Swin's `relative_position_index` and shifted-window `attn_mask` are Derived
(checked on import, written on export). `state_dict_keys` lists the reference's keys in its `state_dict()` order,
so an export has the reference's order as well as its names.
"""
from __future__ import annotations

from af2_jax.convert.af2_keys import htsat_rules
from af2_jax.convert.mapping import IDENTITY, LINEAR, Alias, Rule, Tensor
from af2_jax.models.afclap import AFCLAPConfig
from af2_jax.models.htsat_config import HTSATConfig
from af2_jax.models.t5 import T5Config

PREFIX = "module."  # DistributedDataParallel's, on every key of the released checkpoint
AUDIO_BRANCH, TEXT_BRANCH = "audio_branch.", "text_branch."
SHARED = "shared.weight"
TIED_EMBEDDING = "encoder.embed_tokens.weight"  # the same tensor as `shared` in T5
RELATIVE_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_T5_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}
_MLP = {  # ours -> (torch Linear indices of fc1, fc2)
    "audio_projection": ("0", "2"), "text_projection": ("0", "2"),
    "audio_transform": ("sequential.0", "sequential.3"), "text_transform": ("sequential.0", "sequential.3")}


def _linear(ours: str, theirs: str) -> list[Rule]:
    return [Tensor(f"{ours}/kernel", f"{theirs}.weight", LINEAR), Tensor(f"{ours}/bias", f"{theirs}.bias")]


def t5_rules(config: T5Config, prefix: str = PREFIX + TEXT_BRANCH, ours_prefix: str = "t5/") -> list[Rule]:
    """transformers' T5EncoderModel state dict <-> our T5Encoder (no biases anywhere; one relative-position table,
    block 0's)."""
    p, o = prefix, ours_prefix
    block, layers = f"{p}encoder.block.{{i}}.layer", f"{o}layers"
    rules: list[Rule] = [Tensor(f"{o}embed_tokens", f"{p}{SHARED}"),
                         Alias(f"{p}{TIED_EMBEDDING}", same_as=f"{p}{SHARED}", export=True),
                         Tensor(f"{o}relative_attention_bias", f"{p}{RELATIVE_BIAS}")]
    rules += [Tensor(f"{layers}/attention/{ours}/kernel", f"{block}.0.SelfAttention.{theirs}.weight", LINEAR)
              for theirs, ours in _T5_ATTENTION.items()]
    rules += [Tensor(f"{layers}/attention_norm/scale", f"{block}.0.layer_norm.weight"),
              Tensor(f"{layers}/ff_norm/scale", f"{block}.1.layer_norm.weight")]
    rules += [Tensor(f"{layers}/ff/{name}/kernel", f"{block}.1.DenseReluDense.{name}.weight", LINEAR)
              for name in ("wi_0", "wi_1", "wo")]
    rules.append(Tensor(f"{o}final_norm/scale", f"{p}encoder.final_layer_norm.weight"))
    return rules


def afclap_rules(config: AFCLAPConfig, prefix: str = PREFIX) -> list[Rule]:
    """The whole AF-CLAP state dict (`prefix` + the CLAP module's own keys) <-> our flat AFCLAPModel paths."""
    rules: list[Rule] = [Tensor("logit_scale_a", f"{prefix}logit_scale_a", IDENTITY),
                         Tensor("logit_scale_t", f"{prefix}logit_scale_t", IDENTITY)]
    rules += htsat_rules(config.htsat, prefix + AUDIO_BRANCH, "htsat/")
    rules += t5_rules(config.t5, prefix + TEXT_BRANCH, "t5/")
    for ours, (fc1, fc2) in _MLP.items():
        rules += _linear(f"{ours}/fc1", f"{prefix}{ours}.{fc1}") + _linear(f"{ours}/fc2", f"{prefix}{ours}.{fc2}")
    return rules


# ---------------------------------------------------------------------------------------------------------------
# the reference's key order (torch's state_dict(): a module's own tensors, then its children in definition order)


def _weight_bias(name: str, bias: bool = True) -> list[str]:
    return [f"{name}.weight"] + ([f"{name}.bias"] if bias else [])


def _batch_norm(name: str) -> list[str]:
    return [f"{name}.{leaf}" for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def htsat_state_dict_keys(config: HTSATConfig, prefix: str) -> list[str]:
    p = prefix
    keys = [f"{p}spectrogram_extractor.stft.conv_real.weight", f"{p}spectrogram_extractor.stft.conv_imag.weight",
            f"{p}logmel_extractor.melW", *_batch_norm(f"{p}bn0"), *_weight_bias(f"{p}patch_embed.proj"),
            *_weight_bias(f"{p}patch_embed.norm")]
    if config.enable_fusion:
        fm = f"{p}patch_embed.fusion_model"
        keys += _weight_bias(f"{p}patch_embed.mel_conv2d")
        for branch, (conv1, bn1, conv2, bn2) in (("local_att", "0134"), ("global_att", "1245")):
            keys += [*_weight_bias(f"{fm}.{branch}.{conv1}"), *_batch_norm(f"{fm}.{branch}.{bn1}"),
                     *_weight_bias(f"{fm}.{branch}.{conv2}"), *_batch_norm(f"{fm}.{branch}.{bn2}")]
    for s, depth in enumerate(config.depths):
        for j in range(depth):
            b = f"{p}layers.{s}.blocks.{j}"
            if j % 2 and config.stage_shift(s):  # the block's own buffer comes before its children's
                keys.append(f"{b}.attn_mask")
            keys += [*_weight_bias(f"{b}.norm1"), f"{b}.attn.relative_position_bias_table",
                     f"{b}.attn.relative_position_index", *_weight_bias(f"{b}.attn.qkv", config.qkv_bias),
                     *_weight_bias(f"{b}.attn.proj"), *_weight_bias(f"{b}.norm2"), *_weight_bias(f"{b}.mlp.fc1"),
                     *_weight_bias(f"{b}.mlp.fc2")]
        if s < len(config.depths) - 1:
            keys += [f"{p}layers.{s}.downsample.reduction.weight", *_weight_bias(f"{p}layers.{s}.downsample.norm")]
    return keys + [*_weight_bias(f"{p}norm"), *_weight_bias(f"{p}tscam_conv"), *_weight_bias(f"{p}head")]


def t5_state_dict_keys(config: T5Config, prefix: str) -> list[str]:
    keys = [f"{prefix}{SHARED}", f"{prefix}{TIED_EMBEDDING}"]
    for i in range(config.num_layers):
        block = f"{prefix}encoder.block.{i}.layer"
        keys += [f"{block}.0.SelfAttention.{name}.weight" for name in _T5_ATTENTION]
        if i == 0:
            keys.append(f"{prefix}{RELATIVE_BIAS}")
        keys += [f"{block}.0.layer_norm.weight"]
        keys += [f"{block}.1.DenseReluDense.{name}.weight" for name in ("wi_0", "wi_1", "wo")]
        keys += [f"{block}.1.layer_norm.weight"]
    return keys + [f"{prefix}encoder.final_layer_norm.weight"]


def state_dict_keys(config: AFCLAPConfig, prefix: str = PREFIX) -> list[str]:
    """Every key of the reference `CLAP.state_dict()` (with `prefix`), tied embedding included, in its order."""
    keys = [f"{prefix}logit_scale_a", f"{prefix}logit_scale_t",
            *htsat_state_dict_keys(config.htsat, prefix + AUDIO_BRANCH),
            *t5_state_dict_keys(config.t5, prefix + TEXT_BRANCH)]
    for ours in ("text_transform", "text_projection", "audio_transform", "audio_projection"):
        keys += [key for index in _MLP[ours] for key in _weight_bias(f"{prefix}{ours}.{index}")]
    return keys
