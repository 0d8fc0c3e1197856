"""CIDEr-D against hand-worked values, published properties, and a dense float64 re-derivation of the formula."""
import math
import random

import numpy as np
import pytest

from af2_jax.evaluation.cider import cider_d


def _dense_cider_d(candidates, references, max_n=4, sigma=6.0):
    """The CIDEr-D formula with one dense float64 matrix per n: rows are sentences, columns every n-gram seen."""
    tokenized_refs = [[r.lower().split() for r in refs] for refs in references]
    tokenized_cands = [c.lower().split() for c in candidates]
    num_items = len(references)
    per_item = np.zeros((num_items, max_n))
    for n in range(1, max_n + 1):
        def grams(tokens):
            return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]

        vocab = sorted({g for refs in tokenized_refs for r in refs for g in grams(r)} | {
            g for c in tokenized_cands for g in grams(c)})
        index = {g: i for i, g in enumerate(vocab)}

        def counts(tokens):
            v = np.zeros(len(vocab))
            for g in grams(tokens):
                v[index[g]] += 1
            return v

        # Document frequency: number of items whose reference set contains the n-gram at least once.
        presence = np.stack([np.max([counts(r) for r in refs], axis=0) > 0 for refs in tokenized_refs])
        idf = np.log(num_items) - np.log(np.maximum(1.0, presence.sum(axis=0)))
        for item, (cand, refs) in enumerate(zip(tokenized_cands, tokenized_refs)):
            c = counts(cand) * idf
            for ref in refs:
                r = counts(ref) * idf
                norms = np.linalg.norm(c) * np.linalg.norm(r)
                if norms == 0:
                    continue
                penalty = np.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
                per_item[item, n - 1] += np.minimum(c, r) @ r / norms * penalty / len(refs)
    scores = 10.0 * per_item.mean(axis=1)
    return scores.mean(), scores


def test_hand_worked_two_item_corpus():
    # Two items, every n-gram in exactly one item: idf = log 2 for all reference n-grams.
    # Item 1: "a" vs "a b": unigram cosine = log2^2 / (log2 * sqrt(2) log2) = 1/sqrt 2; no bigrams in the candidate;
    #   length penalty exp(-(1 - 2)^2 / 72); score = 10 * (1/sqrt 2) * exp(-1/72) / 4.
    # Item 2: identical 2-word caption: unigram and bigram cosines 1, no 3- or 4-grams: score = 10 * 2 / 4 = 5.
    corpus, per_item = cider_d(["a", "c d"], [["a b"], ["c d"]])
    expected_1 = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    assert per_item == pytest.approx([expected_1, 5.0], abs=1e-12)
    assert corpus == pytest.approx((expected_1 + 5.0) / 2, abs=1e-12)


def test_published_properties():
    # A caption identical to its only reference, with >= 4 words whose n-grams no other item has, scores 10.
    _, per_item = cider_d(["a dog barks at night", "rain on a roof"], [["a dog barks at night"], ["wind in trees"]])
    assert per_item[0] == pytest.approx(10.0, abs=1e-12)
    # N-grams every item's references contain have idf 0 and earn nothing.
    _, per_item = cider_d(["sound", "sound"], [["sound one"], ["sound two"]])
    assert per_item == [0.0, 0.0]
    # Clipping: repeating a matched word does not raise the score above saying it once.
    refs = [["dog barks loudly"], ["cat sleeps"]]
    once, _ = cider_d(["dog barks", "cat"], refs)
    repeated, _ = cider_d(["dog dog dog dog barks", "cat"], refs)
    assert repeated < once
    # Case and punctuation do not matter.
    assert cider_d(["Dog, barks!"], [["dog barks"]]) == cider_d(["dog barks"], [["dog barks"]])


def test_matches_dense_float64_rederivation_on_a_random_corpus():
    rng = random.Random(0)
    vocab = "dog barks cat meows rain falls on roof car engine starts bird sings loud".split()

    def sentence():
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))

    candidates = [sentence() for _ in range(25)]
    references = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(25)]
    references[4] = [candidates[4], sentence()]  # an exact hit among the references
    expected_corpus, expected_items = _dense_cider_d(candidates, references)
    corpus, per_item = cider_d(candidates, references)
    np.testing.assert_allclose(per_item, expected_items, rtol=1e-10, atol=1e-12)
    assert corpus == pytest.approx(expected_corpus, rel=1e-10)
    assert corpus > 0


def test_rejects_malformed_input():
    with pytest.raises(ValueError):
        cider_d(["x"], [])
    with pytest.raises(ValueError):
        cider_d(["x"], [[]])
    with pytest.raises(ValueError):
        cider_d([], [])
