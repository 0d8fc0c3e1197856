"""AF-CLAP evaluation: cross-modal retrieval (audio->text and text->audio recall at k), zero-shot classification,
and the composition test (does a clip score its own caption above the order-swapped one?).

The metrics are numpy functions of cosine similarities (embeddings are L2-normalised, so a dot product); the model
part is `embed_audio` / `embed_texts`, batched and jitted. Ties count against the right answer (a rank is the
number of candidates scoring at least as high, minus one), so a constant model scores chance, never better.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np

KS = (1, 5, 10)


def _ranks(scores: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Rank of each row's right column: how many candidates score >= it, minus one (0 = first, ties pessimistic)."""
    right_scores = np.take_along_axis(scores, right[:, None], axis=1)
    return (scores >= right_scores).sum(axis=1) - 1


def recall_at_k(similarity: np.ndarray, text_owner: Sequence[int], ks: Sequence[int] = KS) -> dict[str, float]:
    """similarity (audios, texts); text_owner[j] = the audio caption j describes (several captions per audio
    allowed). audio->text: a hit at k when one of the audio's captions ranks in the top k of all texts;
    text->audio: when a caption's audio ranks in the top k of all audios."""
    similarity = np.asarray(similarity, np.float64)
    owner = np.asarray(text_owner, np.int64)
    audios, texts = similarity.shape
    if owner.shape != (texts,) or owner.min(initial=0) < 0 or owner.max(initial=0) >= audios:
        raise ValueError(f"text_owner must give an audio index in [0, {audios}) for each of the {texts} texts")
    if set(owner.tolist()) != set(range(audios)):
        raise ValueError("every audio needs at least one caption for audio->text recall")
    # audio->text: the rank of the audio's best-scoring own caption among all texts
    own = owner[None, :] == np.arange(audios)[:, None]
    best_own = np.where(own, similarity, -np.inf).max(axis=1)
    best_rank = (similarity >= best_own[:, None]).sum(axis=1) - 1
    text_rank = _ranks(similarity.T, owner)
    out = {}
    for k in ks:
        out[f"audio_to_text_R@{k}"] = float(np.mean(best_rank < k))
        out[f"text_to_audio_R@{k}"] = float(np.mean(text_rank < k))
    return out


def zero_shot_accuracy(similarity: np.ndarray, labels: Sequence[int]) -> float:
    """similarity (audios, classes) against one text per class name; the share of audios whose own class scores
    strictly highest (ties are misses)."""
    similarity = np.asarray(similarity, np.float64)
    labels = np.asarray(labels, np.int64)
    return float(np.mean(_ranks(similarity, labels) == 0))


def composition_accuracy(audio: np.ndarray, true_text: np.ndarray, swapped_text: np.ndarray) -> float:
    """Share of clips whose embedding is strictly closer to their own caption than to its composition-swapped
    version (chance 0.5)."""
    audio = np.asarray(audio, np.float64)
    true_score = np.sum(audio * np.asarray(true_text, np.float64), axis=-1)
    swapped_score = np.sum(audio * np.asarray(swapped_text, np.float64), axis=-1)
    return float(np.mean(true_score > swapped_score))


# ---------------------------------------------------------------------------------------------------------------
# the model side


@functools.cache
def _jitted(kind: str):
    import jax
    from flax import nnx

    if kind == "audio":
        return jax.jit(lambda graphdef, state, mel, longer: nnx.merge(graphdef, state).audio_embedding(mel, longer),
                       static_argnums=0)
    return jax.jit(lambda graphdef, state, ids, mask: nnx.merge(graphdef, state).text_embedding(ids, mask),
                   static_argnums=0)


def _batched(kind: str, model: Any, arrays: tuple[np.ndarray, ...], batch_size: int) -> np.ndarray:
    """Runs the jitted embedding over fixed-size batches (the tail padded by repeating its last row), so one
    program is compiled whatever the count."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    count = len(arrays[0])
    out = []
    for start in range(0, count, batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        real = len(chunk[0])
        chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - real, axis=0)]) for c in chunk]
        out.append(np.asarray(_jitted(kind)(graphdef, state, *chunk))[:real])
    return np.concatenate(out) if out else np.zeros((0, model.config.joint_dim), np.float32)


def embed_audio(model: Any, mel_fusion: np.ndarray, longer: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """(N, 4, 1001, 64) mel_fusion + (N,) longer -> (N, joint_dim) L2-normalised audio embeddings."""
    return _batched("audio", model, (np.asarray(mel_fusion, np.float32), np.asarray(longer, bool)), batch_size)


def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Texts -> (T, joint_dim) L2-normalised text embeddings (tokenised to 77 as the reference)."""
    ids, mask = tokenizer(list(texts))
    return _batched("text", model, (ids, mask), batch_size)


def summarize(results: Mapping[str, float]) -> str:
    """One metric per line, as percentages."""
    width = max(len(k) for k in results)
    return "\n".join(f"{k.ljust(width)}  {100 * v:5.1f} %" for k, v in results.items())
