"""AF-CLAP synthetic captions: the facts come from the generator's events (checked against its answers), every
paraphrase is a wording of the truth, every negative a wording of a one-change false variant, and no negative can
ever equal a paraphrase (all wordings enumerated); determinism; composition pairs; the tokenizer covers the words."""
import dataclasses
import functools

import numpy as np
import pytest

from af2_jax.data import captions as C
from af2_jax.data import synthetic
from af2_jax.data.captions import CaptionFacts, Group

SHORT = [synthetic.generate(4, "train", i, synthetic.SHORT_SKILLS) for i in range(300)]
LONG_SKILLS = ("long_order", "long_pitch", "long_count", "long_when")


@pytest.fixture(scope="module")
def long_records():
    return [synthetic.generate(4, "train", i, LONG_SKILLS) for i in range(8)]


@functools.lru_cache(maxsize=None)
def wordings(facts: CaptionFacts) -> frozenset:
    return frozenset(C.all_captions(facts))


def _answer(record):
    return record["answer"].split(") ")[-1]


def _check_facts_against_answer(record, facts):
    """The generator's answer (never read by captions.py) agrees with the facts read from its events."""
    skill, answer, groups = record["skill"], _answer(record), facts.groups
    kinds = [g.kind for g in groups]
    if skill in ("count", "long_count"):
        assert groups == (Group("beep", synthetic.NUMBER_WORDS.index(answer) + 1),)
    elif skill in ("order", "long_order"):
        assert sorted(kinds) == ["beep", "noise"] and kinds[0] == answer.removeprefix("the ")
    elif skill in ("pitch", "long_pitch"):
        assert kinds == ["tone", "tone"] and {g.pitch for g in groups} == {"high", "low"}
        assert groups[1].pitch == ("high" if answer == "higher" else "low")
    elif skill == "timbre":
        assert len(groups) == 1 and groups[0].instrument == answer and groups[0].count in (2, 3)
    elif skill == "loudness":
        assert groups == (Group("beep", 1, loudness=answer),) and facts.background == ("hiss",)
    elif skill == "duration":
        assert groups == (Group("tone", 1, length=answer),)
    elif skill == "caption":
        beeps = groups[0]
        noise = len(groups) == 2 and groups[1] == Group("noise")
        assert beeps.kind == "beep" and len(groups) == 1 + noise
        assert synthetic._caption_text(beeps.count, beeps.pitch == "high", noise) == answer
    elif skill == "long_when":
        assert groups == (Group("whistle", 1, contour="rising"),) and facts.background == ("beeps", "hiss")
        assert facts.minute == [f"the {w} minute" for w in synthetic.ORDINAL_WORDS].index(answer)
    else:
        raise AssertionError(skill)
    if skill.startswith("long_"):
        assert facts.minutes == round(record["duration"] / 60) and facts.background
        assert facts.far_apart == (skill in ("long_order", "long_pitch"))
    else:
        assert facts.minutes is None and facts.minute is None and not facts.far_apart


def test_facts_come_from_the_generators_events_not_its_text(long_records):
    for record in SHORT + long_records:
        facts = C.caption_facts(record)
        _check_facts_against_answer(record, facts)
        blind = dict(record, prompt="?", answer="?", choices=[], skill=None)
        assert C.caption_facts(blind) == facts  # the text plays no part
    moved = dict(SHORT[1], events=[dict(e, start=10.0 - e["start"]) for e in SHORT[1]["events"]])  # an order record
    assert C.caption_facts(moved).groups == C.caption_facts(SHORT[1]).groups[::-1]
    with pytest.raises(ValueError, match="events"):
        C.caption_facts({k: v for k, v in SHORT[0].items() if k != "events"})


def _one_change(truth: CaptionFacts, kind: str, variant: CaptionFacts):
    """The variant differs from the truth exactly as its type says (so it is false of the clip)."""
    a, b = truth.groups, variant.groups
    same_context = dataclasses.replace(variant, groups=a, minute=truth.minute) == truth
    assert same_context, (truth, variant)
    if kind == "order":
        assert sorted(map(repr, a)) == sorted(map(repr, b)) and a != b
    elif kind == "attribute":
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
        x, y = next((x, y) for x, y in zip(a, b) if x != y)
        assert x.kind == y.kind and x.count == y.count
        fields = ("pitch", "loudness", "length", "contour", "instrument")
        changed = [f for f in fields if getattr(x, f) != getattr(y, f)]
        assert len(changed) == 1 and getattr(x, changed[0]) is not None
        if changed[0] != "instrument":
            assert C.OPPOSITE[getattr(x, changed[0])] == getattr(y, changed[0])
    elif kind == "count":
        assert [g.kind for g in a] == [g.kind for g in b]
        assert sum(x.count != y.count for x, y in zip(a, b)) == 1
    elif kind == "time":
        assert a == b and variant.minute != truth.minute
    elif kind == "kind":
        present = {C.FAMILY[g.kind] for g in a} | {C.BACKGROUND_FAMILY[x] for x in truth.background}
        new = [y for x, y in zip(a, b) if x != y]
        assert len(new) == 1 and C.FAMILY[new[0].kind] not in present
    else:
        raise AssertionError(kind)


def test_no_negative_wording_ever_equals_a_paraphrase_of_the_truth(long_records):
    distinct = {C.caption_facts(r) for r in SHORT} | {C.caption_facts(r) for r in long_records[:4]}
    assert len(distinct) >= 25  # every short skill's variants
    checked = 0
    for facts in distinct:
        truth = wordings(facts)
        variants = C.negative_facts(facts)
        assert variants
        for kind, variant in variants:
            _one_change(facts, kind, variant)
            overlap = truth & wordings(variant)
            assert not overlap, (facts, kind, sorted(overlap)[:3])
            checked += len(wordings(variant))
    assert checked > 100000


def test_sampled_paraphrases_are_true_and_negatives_false_over_300_records(long_records):
    m, n = 5, 6
    counts = {t: 0 for t in C.NEGATIVE_TYPES}
    for k, record in enumerate(SHORT + long_records[:4]):
        facts = C.caption_facts(record)
        rng = np.random.default_rng(k)
        positives = C.positive_captions(facts, rng, m)
        negatives = C.negative_captions(facts, rng, n, with_types=True)
        truth = wordings(facts)
        assert len(positives) == m and len(set(positives)) == m and set(positives) <= truth
        assert len(negatives) == n and len({t for _, t in negatives}) == n
        variants = C.negative_facts(facts)
        for kind, text in negatives:
            assert text not in truth
            assert any(text in wordings(v) for t, v in variants if t == kind), (kind, text)  # a false variant
            counts[kind] += 1
    assert all(counts[t] for t in C.NEGATIVE_TYPES), counts
    assert counts["order"] >= 80 and counts["attribute"] >= 120  # the composition-aware types come first


def test_negative_types_swap_order_attributes_and_counts():
    noise_then_beep = CaptionFacts((Group("noise"), Group("beep")), ("silence",))
    assert C.composition_test(noise_then_beep) == ("a noise burst and then a beep", "a beep and then a noise burst")
    order = [v for t, v in C.negative_facts(noise_then_beep) if t == "order"]
    assert [v.groups for v in order] == [(Group("beep"), Group("noise"))]
    assert "a beep and then a noise" in wordings(order[0]) and "a noise and then a beep" in wordings(noise_then_beep)

    high = CaptionFacts((Group("beep", 2, pitch="high"), Group("noise")), ("silence",))
    negatives = C.negative_facts(high)
    attribute = {v.groups[0] for t, v in negatives if t == "attribute"}
    assert attribute == {Group("beep", 2, pitch="low")}
    assert {v.groups[0].count for t, v in negatives if t == "count" and v.groups[1] == Group("noise")} == {1, 3, 4}
    assert "two low beeps and then a noise" in wordings(dict(negatives)["attribute"])
    # A relative pair (the pitch skill) is negated by its order, never by making both tones one pitch.
    rising = CaptionFacts((Group("tone", pitch="low"), Group("tone", pitch="high")), ("silence",))
    assert not [v for t, v in C.negative_facts(rising) if t == "attribute"]
    assert "two tones, falling in pitch" in wordings(dict(C.negative_facts(rising))["order"])
    for facts, wanted in ((CaptionFacts((Group("beep", loudness="loud"),), ("hiss",)), "a quiet beep"),
                          (CaptionFacts((Group("tone", length="long"),), ("silence",)), "a short tone"),
                          (CaptionFacts((Group("whistle", contour="rising"),), ("beeps", "hiss"), 3, False, 1),
                           "a falling whistle in the second minute")):
        assert wanted in wordings(dict(C.negative_facts(facts))["attribute"])
    # Kind swaps only go to a family the clip lacks: no beeps or tones where tonal sounds are present.
    loud = CaptionFacts((Group("beep", loudness="loud"),), ("hiss",))
    assert {v.groups[0].kind for t, v in C.negative_facts(loud) if t == "kind"} == {"whistle"}


def test_determinism_and_the_source():
    facts = C.caption_facts(SHORT[1])

    def draw(seed):
        return (C.positive_captions(facts, np.random.default_rng(seed), 4),
                C.negative_captions(facts, np.random.default_rng(seed), 4))

    assert draw(3) == draw(3) and draw(3) != draw(4)
    source = C.SyntheticCaptionSource("train", 20, seed=4, num_positives=3, num_negatives=5)
    a, b = source[5], source[5]
    assert a["captions"] == b["captions"] and a["negatives"] == b["negatives"]
    assert np.array_equal(a["waveform"], SHORT[5]["waveform"]) and a["id"] == SHORT[5]["id"]
    assert len(a["captions"]) == 3 and len(a["negatives"]) == 5 and a["sample_rate"] == synthetic.SAMPLE_RATE
    assert source[6]["captions"] != a["captions"]
    with pytest.raises(ValueError, match="unknown synthetic skills"):
        C.SyntheticCaptionSource("train", 4, skills=["nope"])
    with pytest.raises(IndexError):
        source[20]


def test_composition_pairs_where_order_is_defined(long_records):
    seen = set()
    for k, record in enumerate(SHORT[:70] + long_records):
        facts = C.caption_facts(record)
        has_order = len(facts.groups) >= 2
        for rng in (None, np.random.default_rng(k)):
            pair = C.composition_test(facts, rng)
            assert (pair is not None) == has_order, record["skill"]
            if pair is None:
                continue
            true, swapped = pair
            assert true in wordings(facts) and swapped not in wordings(facts)
            swapped_facts = dict(C.negative_facts(facts))["order"]
            assert swapped in wordings(swapped_facts)
            assert sorted(true.replace(",", "").split()) == sorted(swapped.replace(",", "").split())  # same words
            seen.add(record["skill"])
    assert seen == {"order", "pitch", "caption", "long_order", "long_pitch"}


def test_every_word_is_in_the_synthetic_tokenizer(long_records):
    tok = C.synthetic_caption_tokenizer()
    unk = tok._raw.token_to_id("<unk>")
    texts = []
    for k, record in enumerate(SHORT[:100] + long_records):
        facts = C.caption_facts(record)
        rng = np.random.default_rng(k)
        texts += C.positive_captions(facts, rng, 8) + C.negative_captions(facts, rng, 8)
    ids, mask = tok(texts)
    assert not np.any(ids == unk)
    assert np.all(mask.sum(1) < 77)  # nothing truncated
