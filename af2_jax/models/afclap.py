"""AF-CLAP (Audio Flamingo 2's contrastive audio-text model) in Flax NNX, eval semantics of NVIDIA's `CLAP` with
`amodel='HTSAT-afclap', tmodel='t5'` (afclap_reference.md section 1):

  audio   mel_fusion (B, 4, 1001, 64), longer (B,) -> HTSAT (fusion for `longer` clips) -> mean of the 64 final-norm
          tokens (B, C) -> audio_projection Linear(C, J), ReLU, Linear(J, J) -> L2 normalise
  text    input_ids, attention_mask (B, 77) -> T5 encoder -> mean over ALL 77 positions (padding included)
          -> text_projection Linear(d_model, J), ReLU, Linear(J, J) -> L2 normalise
  mlp     audio_transform / text_transform = Linear(J, J), ReLU, Dropout(0.1), Linear(J, J) on the normalised
          features (not renormalised; only the optional mlp loss reads them)
  scales  logit_scale_a, logit_scale_t: scalar log scales; the forward returns their exp

The `htsat` attribute is our `HTSAT`, so its parameter paths are exactly AF2's `htsat/...` subtree: the audio half
of an AF-CLAP model initialises AF2's HTSAT with no renaming. No loss and no training logic live here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax.models.htsat import HTSAT, HTSATConfig, htsat_preset
from af2_jax.models.layers import Dense, dropout
from af2_jax.models.t5 import T5Config, T5Encoder, t5_preset

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize


@dataclasses.dataclass(frozen=True)
class AFCLAPConfig:
    htsat: HTSATConfig
    t5: T5Config
    joint_dim: int = 512  # the CLAP constructor's default joint_embed_shape (HTSAT-afclap.json does not set it)
    context_length: int = 77  # every text is padded/truncated to this many tokens
    transform_dropout: float = 0.1
    logit_scale_init: float = math.log(1 / 0.07)
    dtype: Any = jnp.float32  # compute of the projections and transforms
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.joint_dim <= 0 or self.context_length <= 0:
            raise ValueError(f"joint_dim and context_length must be positive, got {self.joint_dim}, "
                             f"{self.context_length}")
        if not self.htsat.enable_fusion:
            raise ValueError("AF-CLAP's HTSAT runs the fusion branch (htsat.enable_fusion=True)")
        if not 0.0 <= self.transform_dropout < 1.0:
            raise ValueError(f"transform_dropout must be in [0, 1), got {self.transform_dropout}")

    @property
    def audio_width(self) -> int:
        return self.htsat.num_features

    @property
    def text_width(self) -> int:
        """Input width of text_projection. The reference hard-codes 1024 (flan-t5-large's width) instead of reading
        the T5 config; we read t5.d_model, which is the same for every model the reference can build."""
        return self.t5.d_model


# name -> (htsat preset, t5 preset, joint_dim); the tiny one is the golden fixture afclap_tiny (config.json)
AFCLAP_PRESETS: dict[str, dict] = {
    "tiny": dict(htsat="tiny", t5="tiny", joint_dim=96),
    "large": dict(htsat="large", t5="flan-t5-large", joint_dim=512),
}


def afclap_preset(name: str, *, htsat: dict | None = None, t5: dict | None = None, **overrides) -> AFCLAPConfig:
    """A preset's config; `htsat=` / `t5=` are field overrides of the sub-configs (e.g. the tiny curriculum's
    `htsat=dict(depths=(2, 2, 2, 2))`), other keywords replace AFCLAPConfig fields. `dtype=`/`param_dtype=` set
    every sub-config's too."""
    if name not in AFCLAP_PRESETS:
        raise KeyError(f"unknown AF-CLAP preset {name!r}; choose one of {sorted(AFCLAP_PRESETS)}")
    spec = AFCLAP_PRESETS[name]
    dtypes = {k: overrides[k] for k in ("dtype", "param_dtype") if k in overrides}
    fields = dict(htsat=htsat_preset(spec["htsat"], **{**dtypes, **(htsat or {})}),
                  t5=t5_preset(spec["t5"], **{**dtypes, **(t5 or {})}), joint_dim=spec["joint_dim"])
    fields.update(overrides)
    return AFCLAPConfig(**fields)


def l2_normalize(x: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
    """x / max(||x||, eps) over the last axis, in fp32 (torch.nn.functional.normalize)."""
    x32 = x.astype(jnp.float32)
    return x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)


class ProjectionMLP(nnx.Module):
    """fc1 -> ReLU -> [dropout] -> fc2, all with biases: the projections (no dropout) and the transforms."""

    def __init__(self, din: int, dim: int, in_axis: str, config: AFCLAPConfig, *, rate: float = 0.0,
                 rngs: nnx.Rngs):
        dense = dict(use_bias=True, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.rate = rate
        self.fc1 = Dense(din, dim, (in_axis, "mlp"), **dense)
        self.fc2 = Dense(dim, dim, ("mlp", "embed"), **dense)

    def hidden(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.fc1(x))

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return self.fc2(dropout(self.hidden(x), self.rate, key))


class AFCLAPModel(nnx.Module):
    def __init__(self, config: AFCLAPConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.htsat = HTSAT(c.htsat, rngs=rngs)
        self.t5 = T5Encoder(c.t5, rngs=rngs)
        self.audio_projection = ProjectionMLP(c.audio_width, c.joint_dim, "audio_embed", c, rngs=rngs)
        self.text_projection = ProjectionMLP(c.text_width, c.joint_dim, "embed", c, rngs=rngs)
        self.audio_transform = ProjectionMLP(c.joint_dim, c.joint_dim, "embed", c, rate=c.transform_dropout,
                                             rngs=rngs)
        self.text_transform = ProjectionMLP(c.joint_dim, c.joint_dim, "embed", c, rate=c.transform_dropout,
                                            rngs=rngs)
        self.logit_scale_a = nnx.Param(jnp.asarray(c.logit_scale_init, c.param_dtype), out_sharding=())
        self.logit_scale_t = nnx.Param(jnp.asarray(c.logit_scale_init, c.param_dtype), out_sharding=())

    # ---- audio --------------------------------------------------------------------------------------------------
    def audio_pooled(self, mel_fusion: jax.Array, longer: jax.Array) -> jax.Array:
        """HTSAT's `embedding`: the mean of its 64 final-norm tokens, (B, C) fp32."""
        return self.htsat.clip_tokens(mel_fusion, longer).astype(jnp.float32).mean(axis=1)

    def audio_embedding(self, mel_fusion: jax.Array, longer: jax.Array) -> jax.Array:
        """mel_fusion (B, 4, 1001, 64), longer (B,) bool -> L2-normalised (B, joint_dim) fp32."""
        return l2_normalize(self.audio_projection(self.audio_pooled(mel_fusion, longer)))

    # ---- text ---------------------------------------------------------------------------------------------------
    def text_pooled(self, input_ids: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True,
                    rngs: nnx.Rngs | None = None) -> jax.Array:
        """Mean of T5's last hidden state over every position, padding included (the reference's pooling)."""
        if input_ids.shape[-1] != self.config.context_length:
            raise ValueError(f"texts must be padded to {self.config.context_length} tokens (the pooling averages "
                             f"every position), got {input_ids.shape}")
        hidden = self.t5(input_ids, attention_mask, deterministic=deterministic, rngs=rngs)
        return hidden.astype(jnp.float32).mean(axis=1)

    def text_embedding(self, input_ids: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True,
                       rngs: nnx.Rngs | None = None) -> jax.Array:
        """input_ids, attention_mask (B, 77) -> L2-normalised (B, joint_dim) fp32."""
        pooled = self.text_pooled(input_ids, attention_mask, deterministic=deterministic, rngs=rngs)
        return l2_normalize(self.text_projection(pooled))

    # ---- both ---------------------------------------------------------------------------------------------------
    def __call__(self, mel_fusion: jax.Array, longer: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                 *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        """CLAP.forward's six outputs. `deterministic=False` turns on the transforms' (and T5's) dropout, whose keys
        come from `rngs.dropout()`; the HTSAT always runs in eval mode here."""
        if not deterministic and rngs is None:
            raise ValueError("AFCLAPModel with deterministic=False needs rngs (dropout)")
        keys = [None, None]
        if not deterministic:
            keys = list(jax.random.split(rngs.dropout(), 2))
        audio = self.audio_embedding(mel_fusion, longer)
        text = self.text_embedding(input_ids, attention_mask, deterministic=deterministic, rngs=rngs)
        return {
            "audio_features": audio,
            "text_features": text,
            "audio_features_mlp": self.audio_transform(audio, key=keys[0]).astype(jnp.float32),
            "text_features_mlp": self.text_transform(text, key=keys[1]).astype(jnp.float32),
            "logit_scale_a": jnp.exp(self.logit_scale_a[...].astype(jnp.float32)),
            "logit_scale_t": jnp.exp(self.logit_scale_t[...].astype(jnp.float32)),
        }
