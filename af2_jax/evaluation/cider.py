"""CIDEr-D (Vedantam et al., CVPR 2015), the captioning metric AF2's papers report for Clotho and AudioCaps.

Written from the published definition, in the variant of the coco-caption evaluation code that produced those
numbers, so that a score here is comparable to one there:
  - each sentence becomes, for n = 1..4, a TF-IDF vector over its n-grams: raw count times
    log(number of items) - log(max(1, number of items whose references contain the n-gram)); document frequencies
    come from the references of the whole corpus, never from the candidates;
  - per n, the similarity to one reference is sum over n-grams of min(candidate, reference) * reference (the
    candidate's weight is clipped by the reference's, so repeating a word does not pay), divided by the two vector
    norms (unclipped), times a Gaussian length penalty exp(-(len_c - len_r)^2 / (2 * 6^2));
  - an item's score is 10 x the mean over n of the mean over its references; the corpus score is the mean over items.
Sentences are lowercased and split into words with punctuation removed (the reference's PTB tokenizer needs Java).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Mapping, Sequence

MAX_N = 4
SIGMA = 6.0
SCALE = 10.0

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

NgramCounts = dict[int, collections.Counter]


def caption_words(sentence: str) -> list[str]:
    """Lowercase words without punctuation (apostrophes inside words kept, as in "dog's")."""
    return _WORD.findall(sentence.lower())


def _ngram_counts(tokens: Sequence[str]) -> NgramCounts:
    return {
        n: collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        for n in range(1, MAX_N + 1)
    }


def _tfidf(counts: NgramCounts, document_frequency: Mapping[tuple, int], log_num_items: float):
    """Per n: ({n-gram: weight}, vector norm)."""
    vectors = {}
    for n, counter in counts.items():
        vec = {g: tf * (log_num_items - math.log(max(1.0, document_frequency.get(g, 0)))) for g, tf in counter.items()}
        vectors[n] = (vec, math.sqrt(sum(w * w for w in vec.values())))
    return vectors


def _similarity(candidate, reference, length_delta: float) -> list[float]:
    """CIDEr-D similarity of one candidate to one reference, per n (before the x10 scale)."""
    penalty = math.exp(-(length_delta**2) / (2 * SIGMA**2))
    sims = []
    for n in range(1, MAX_N + 1):
        (c_vec, c_norm), (r_vec, r_norm) = candidate[n], reference[n]
        dot = sum(min(w, r_vec[g]) * r_vec[g] for g, w in c_vec.items() if g in r_vec)
        sims.append(dot / (c_norm * r_norm) * penalty if c_norm and r_norm else 0.0)
    return sims


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-item scores) of one candidate caption per item against that item's references.

    Document frequencies need the whole test set: score a corpus at once, not item by item.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr-D of an empty corpus is undefined")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every item needs at least one reference caption")
    ref_tokens = [[caption_words(r) for r in refs] for refs in references]
    ref_counts = [[_ngram_counts(t) for t in refs] for refs in ref_tokens]
    # An n-gram's document frequency counts items (not reference sentences) whose references contain it.
    document_frequency: collections.Counter = collections.Counter()
    for item in ref_counts:
        document_frequency.update(set().union(*(set(c) for counts in item for c in counts.values())))
    log_num_items = math.log(float(len(references)))

    scores = []
    for candidate, refs_tok, refs_counts in zip(candidates, ref_tokens, ref_counts):
        cand_tok = caption_words(candidate)
        cand_vec = _tfidf(_ngram_counts(cand_tok), document_frequency, log_num_items)
        per_n = [0.0] * MAX_N
        for tokens, counts in zip(refs_tok, refs_counts):
            ref_vec = _tfidf(counts, document_frequency, log_num_items)
            for n, s in enumerate(_similarity(cand_vec, ref_vec, len(cand_tok) - len(tokens))):
                per_n[n] += s
        scores.append(SCALE * sum(per_n) / MAX_N / len(refs_tok))
    return sum(scores) / len(scores), scores
