"""AF-CLAP's contrastive losses as pure functions of the embeddings (the model is not known here).

Logit scales are passed in log space, as the parameters `logit_scale_a` / `logit_scale_t` are stored, and
exponentiated here; `clamp_logit_scale` is the clamp to [0, ln 100] that the reference applies after every optimizer
step. Logits, softmaxes and losses are at least float32 whatever the feature dtype, with full-precision matmuls.

Global batch. The functions run under `jax.jit` on global arrays, sharded over the mesh's batch axes
('data', 'fsdp'). A logit matrix therefore spans the whole global batch: the features are gathered across the data
axes by construction (XLA inserts the all-gathers), and the gradient reaches every copy of a feature, which is
LAION's `gather_with_grad=True` without `local_loss`. The logit rows are constrained to the batch axes, so that each
device holds only its own rows times all columns (a no-op outside `jax.set_mesh`).

`clip_loss` is LAION's `ClipLoss` (the loss NVIDIA's AF-CLAP code computes; shared/docs/afclap_reference.md §3).

`composition_loss` is the composition-aware objective that the AF-CLAP paper describes and no released code
implements (§8): each audio has M positive captions (paraphrases) and N negatives (temporal-order or attribute
swaps of its own caption). Audio a's softmax runs over the positives of every audio in the batch plus a's OWN
negatives; other audios' negatives are removed with an additive -inf mask (a select to the most negative finite
float, so no inf or nan appears in values or gradients). Negatives are never queries: the text->audio direction has
the B·M positives as queries over the B audios. With M > 1 the audio->text target is the distribution uniform over
a's M positives (the mean over those positives of -log softmax, SupCon's "L_out"): the paraphrases share the
probability mass, so the loss floor is ½·log M rather than 0, and the gradient does not let one paraphrase win
at the expense of the others (a log-sum over positives, "L_in", would). At M = 1 both directions reduce to CompA's
intended objective. loss = ½·(mean over audios + mean over positive captions).

Why not CompA's literal mask (`compa_reference_loss`, kept only to show the difference against the fixture):
CompA multiplies the logits by a mask of 1 (kept) and -1e5 (masked). A masked logit z becomes -1e5·z, which is a
huge NEGATIVE logit only when z > 0; every masked similarity below zero becomes +1e5·|z| and dominates the softmax,
so the loss measures the other audios' most dissimilar negatives (fixture `afclap_tiny`: 1.5e5 instead of 1.93).
The masked entries must be removed, which an additive -inf does whatever their sign.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from af2_jax import sharding

LOGIT_SCALE_MAX = math.log(100.0)  # the reference clamps the log scales to [0, ln 100]
COMPA_MASK_VALUE = -1e5  # CompA's multiplicative mask value, for `compa_reference_loss` only

_HIGHEST = jax.lax.Precision.HIGHEST
_ROWS = ("act_batch", None)  # logit rows follow the batch sharding; columns span the global batch


class MlpFeatures(NamedTuple):
    """The inputs of LAION's mlp loss: `audio_transform(A)`, `text_transform(T)` (not normalised) and the
    log-space `logit_scale_t`."""
    audio_features: jax.Array
    text_features: jax.Array
    logit_scale_t: jax.Array


class CompaReference(NamedTuple):
    """CompA stage-2's literal computation: loss, logits_per_audio (B, B(N+1)) after the multiplicative mask,
    logits_per_text (B, B) and the mask (B(N+1), B) of 1 / -1e5."""
    loss: jax.Array
    logits_per_audio: jax.Array
    logits_per_text: jax.Array
    mask: jax.Array


def clamp_logit_scale(x: jax.Array) -> jax.Array:
    """A log-space logit scale clamped to [0, ln 100] (the reference does this in place after every step)."""
    return jnp.clip(x, 0.0, LOGIT_SCALE_MAX)


def _compute_dtype(*arrays: jax.Array):
    return jnp.result_type(jnp.float32, *arrays)


def _scale(log_scale: jax.Array, dtype) -> jax.Array:
    log_scale = jnp.asarray(log_scale, dtype)
    if log_scale.size != 1:
        raise ValueError(f"a logit scale must be a scalar (or shape (1,)), got shape {log_scale.shape}")
    return jnp.exp(log_scale.reshape(()))


def _check_pair(audio_features: jax.Array, text_features: jax.Array, what: str) -> None:
    if audio_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(f"{what}: audio and text features must be (B, J), got {audio_features.shape} and "
                         f"{text_features.shape}")
    if audio_features.shape != text_features.shape:
        raise ValueError(f"{what}: audio features {audio_features.shape} and text features {text_features.shape} "
                         f"must have the same (B, J): row i of each is one pair")


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over rows of -log softmax(logits)[target]."""
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logit)


def clip_logits(audio_features: jax.Array, text_features: jax.Array,
                logit_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits_per_audio = s·A·Tᵀ, logits_per_text = s·T·Aᵀ), s = exp(logit_scale), over the global batch."""
    _check_pair(audio_features, text_features, "clip_logits")
    dtype = _compute_dtype(audio_features, text_features)
    a, t = audio_features.astype(dtype), text_features.astype(dtype)
    s = _scale(logit_scale, dtype)
    # Two products rather than a transpose: each keeps its rows on their own devices.
    per_audio = sharding.constrain(s * jnp.einsum("aj,tj->at", a, t, precision=_HIGHEST), _ROWS)
    per_text = sharding.constrain(s * jnp.einsum("tj,aj->ta", t, a, precision=_HIGHEST), _ROWS)
    return per_audio, per_text


def _symmetric_ce(audio_features, text_features, logit_scale) -> tuple[jax.Array, jax.Array]:
    per_audio, per_text = clip_logits(audio_features, text_features, logit_scale)
    labels = jnp.arange(per_audio.shape[0])
    return _cross_entropy(per_audio, labels), _cross_entropy(per_text, labels)


def clip_loss(audio_features: jax.Array, text_features: jax.Array, logit_scale_a: jax.Array, *,
              mlp: MlpFeatures | tuple | None = None) -> jax.Array:
    """LAION's symmetric CLIP loss over the global batch (pair i = audio row i, text row i); a scalar.

    audio_features, text_features: (B, J), normalised. logit_scale_a: log space (exp is taken here).
    Without `mlp`: ½·[CE(s_a·A·Tᵀ) + CE(s_a·T·Aᵀ)], labels arange(B), mean over rows, no label smoothing.
    With `mlp` = (A_mlp, T_mlp, logit_scale_t): the mean of the four CEs over s_a·A·T_mlpᵀ, s_a·T_mlp·Aᵀ,
    s_t·A_mlp·Tᵀ and s_t·T·A_mlpᵀ (LAION's `mlp_loss=True`).
    Called under `jax.jit` on arrays sharded over ('data', 'fsdp'), the features are gathered across the mesh's
    data axes by construction and the gradient flows through every gathered copy (LAION's gather_with_grad).
    """
    if mlp is None:
        ce_audio, ce_text = _symmetric_ce(audio_features, text_features, logit_scale_a)
        return 0.5 * (ce_audio + ce_text)
    audio_mlp, text_mlp, logit_scale_t = mlp
    _check_pair(audio_features, text_features, "clip_loss")
    a_audio, a_text = _symmetric_ce(audio_features, text_mlp, logit_scale_a)
    t_audio, t_text = _symmetric_ce(audio_mlp, text_features, logit_scale_t)
    return 0.25 * (a_audio + a_text + t_audio + t_text)


def _structure_texts(audio_features: jax.Array, text_features: jax.Array, num_positives: int,
                     num_negatives: int, what: str) -> jax.Array:
    """Text features as (B, M+N, J): [positive_1..M, negative_1..N] per audio."""
    if isinstance(num_positives, bool) or not isinstance(num_positives, int) or num_positives < 1:
        raise ValueError(f"{what}: num_positives must be an int >= 1, got {num_positives!r}")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 0:
        raise ValueError(f"{what}: num_negatives must be an int >= 0, got {num_negatives!r}")
    if audio_features.ndim != 2:
        raise ValueError(f"{what}: audio features must be (B, J), got {audio_features.shape}")
    b, j = audio_features.shape
    k = num_positives + num_negatives
    expected = f"(B·(M+N), J) = ({b * k}, {j}) or (B, M+N, J) = ({b}, {k}, {j})"
    if text_features.ndim == 2:
        if text_features.shape != (b * k, j):
            raise ValueError(f"{what}: text features {text_features.shape} do not match audio features "
                             f"{audio_features.shape} with M={num_positives} positives and N={num_negatives} "
                             f"negatives per audio: expected {expected}")
        return text_features.reshape(b, k, j)
    if text_features.ndim == 3 and text_features.shape == (b, k, j):
        return text_features
    raise ValueError(f"{what}: text features {text_features.shape} do not match audio features "
                     f"{audio_features.shape} with M={num_positives} positives and N={num_negatives} negatives per "
                     f"audio: expected {expected}")


def composition_mask(batch: int, num_positives: int, num_negatives: int) -> jax.Array:
    """Which texts audio a's softmax sees, (B, B, M+N) bool over (audio a, text owner b, slot k): every positive
    (k < M) and a's own negatives (b == a)."""
    owner = jnp.arange(batch)
    slot = jnp.arange(num_positives + num_negatives)
    own = owner[:, None, None] == owner[None, :, None]
    return own | (slot < num_positives)[None, None, :]


def composition_logits(audio_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array, *,
                       num_positives: int, num_negatives: int, negative_valid: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """(logits_per_audio (B, B·(M+N)), masked; logits_per_text (B·M, B), positives only).

    logits_per_audio[a, b·(M+N) + k] = s·⟨A_a, T_b,k⟩ where audio a may see text (b, k), the most negative finite
    float elsewhere (the additive -inf mask); the columns follow the flat text order. logits_per_text row b·M + m
    is positive caption m of audio b against every audio. `negative_valid` (B, N), when given, removes the
    negatives it marks 0 (a record with fewer negatives than N) from their audio's softmax as well.
    """
    texts = _structure_texts(audio_features, text_features, num_positives, num_negatives, "composition_logits")
    dtype = _compute_dtype(audio_features, texts)
    a, t = audio_features.astype(dtype), texts.astype(dtype)
    s = _scale(logit_scale, dtype)
    b, k, _ = t.shape
    z = s * jnp.einsum("aj,bkj->abk", a, t, precision=_HIGHEST)
    visible = composition_mask(b, num_positives, num_negatives)
    if negative_valid is not None:
        if negative_valid.shape != (b, num_negatives):
            raise ValueError(f"composition_logits: negative_valid must be (B, N) = ({b}, {num_negatives}), got "
                             f"{negative_valid.shape}")
        slot_valid = jnp.concatenate([jnp.ones((b, num_positives), bool), negative_valid.astype(bool)], axis=1)
        visible = visible & slot_valid[None, :, :]
    z = jnp.where(visible, z, jnp.finfo(dtype).min)
    per_audio = sharding.constrain(z.reshape(b, b * k), _ROWS)
    positives = t[:, :num_positives].reshape(b * num_positives, -1)
    per_text = sharding.constrain(s * jnp.einsum("pj,aj->pa", positives, a, precision=_HIGHEST), _ROWS)
    return per_audio, per_text


def composition_loss(audio_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array, *,
                     num_positives: int = 1, num_negatives: int, negative_valid: jax.Array | None = None
                     ) -> jax.Array:
    """Contrastive loss with M positive captions and N composition-swapped negatives per audio; a scalar.

    audio_features (B, J); text_features (B·(M+N), J) ordered [pos_1..pos_M, neg_1..neg_N] per audio (CompA's
    order at M = 1), or (B, M+N, J). logit_scale: log space. Audio a's softmax spans every audio's positives plus
    its own negatives; its target is uniform over its own M positives (the mean of their -log softmax). Each
    positive caption's softmax spans the B audios, target its own audio. loss = ½·(CE_audio + CE_text).
    `negative_valid` (B, N): negatives marked 0 are left out (see `composition_logits`).
    """
    per_audio, per_text = composition_logits(audio_features, text_features, logit_scale,
                                             num_positives=num_positives, num_negatives=num_negatives,
                                             negative_valid=negative_valid)
    b = audio_features.shape[0]
    k = num_positives + num_negatives
    # Audio a's positives sit in columns a·(M+N) + m, m < M.
    positive_columns = (jnp.arange(b) * k)[:, None] + jnp.arange(num_positives)[None, :]
    positive_logits = jnp.take_along_axis(per_audio, positive_columns, axis=-1)
    ce_audio = jnp.mean(jax.nn.logsumexp(per_audio, axis=-1)[:, None] - positive_logits)
    ce_text = _cross_entropy(per_text, jnp.repeat(jnp.arange(b), num_positives))
    return 0.5 * (ce_audio + ce_text)


def compa_reference_loss(audio_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array, *,
                         num_negatives: int) -> CompaReference:
    """CompA stage 2's literal loss (one positive, N negatives, multiplicative -1e5 mask), for comparison only.

    text_features (B·(N+1), J) ordered [pos, neg_1..neg_N] per audio. Z = s·T·Aᵀ; mask[i, a] = 1 where
    i mod (N+1) = 0 or i div (N+1) = a, else -1e5; logits_per_audio = Zᵀ ⊙ maskᵀ with targets a·(N+1);
    logits_per_text = the positive rows of Z with targets arange(B); loss = ½·(CE_audio + CE_text).
    Do not train with it: the module docstring says why.
    """
    texts = _structure_texts(audio_features, text_features, 1, num_negatives, "compa_reference_loss")
    b, k, j = texts.shape
    dtype = _compute_dtype(audio_features, texts)
    a, t = audio_features.astype(dtype), texts.reshape(b * k, j).astype(dtype)
    s = _scale(logit_scale, dtype)
    z = s * jnp.einsum("tj,aj->ta", t, a, precision=_HIGHEST)
    kept = composition_mask(b, 1, num_negatives).transpose(1, 2, 0).reshape(b * k, b)  # (text, audio)
    mask = jnp.where(kept, 1.0, COMPA_MASK_VALUE).astype(dtype)
    per_audio = z.T * mask.T
    per_text = z[::k]
    labels = jnp.arange(b)
    loss = 0.5 * (_cross_entropy(per_audio, labels * k) + _cross_entropy(per_text, labels))
    return CompaReference(loss, per_audio, per_text, mask)
