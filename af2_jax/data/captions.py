"""Captions for AF-CLAP contrastive training, made from the synthetic generator's own event structure.

    record['events'] (af2_jax.data.synthetic.generate)  ->  caption_facts(record)  ->  CaptionFacts
      positive_captions(facts, rng, m)   m paraphrases, all true of the clip
      negative_captions(facts, rng, n)   n hard negatives, all false of the clip (order, attribute, time, count or
                                         kind changed), never equal to any paraphrase of the truth
      composition_test(facts)            (true caption, the same words in swapped order) where order is defined

The facts never come from the question or answer text: they are read from the events the generator placed. The
grammar (docs/CLAP_DATA.md) mentions every foreground fact in every caption (each event group's count, kind and
attributes, their order, the minute), each value with words no other value uses; only the prefix, the background
and the recording length are optional. A negative changes one foreground fact, so it is false, and it cannot read
like a paraphrase of the truth; `all_captions` enumerates every paraphrase so the tests check that exhaustively.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np

from af2_jax.data import synthetic

# ------------------------------------------------------------------------------------------------------- the facts
# Sound families: a kind swap only moves to a family the clip has none of (a 'tone' instead of a beep would still
# be a tonal event the clip has, so it would not be clearly false).
FAMILY = {"beep": "tonal", "tone": "tonal", "note": "tonal", "noise": "noise", "whistle": "whistle"}
BACKGROUND_FAMILY = {"hiss": "noise", "whistles": "whistle", "beeps": "tonal", "silence": None}
ATTRIBUTES = {"beep": ("loudness", "pitch"), "tone": ("length", "pitch"), "note": ("instrument",), "noise": (),
              "whistle": ("contour",)}
OPPOSITE = {"high": "low", "low": "high", "loud": "quiet", "quiet": "loud", "long": "short", "short": "long",
            "rising": "falling", "falling": "rising"}
NEGATIVE_TYPES = ("order", "attribute", "time", "count", "kind")  # the order negatives are drawn in, hardest first
LONG_RECORDING_S = 60.0  # from here on a clip is a "recording of N minutes" and may have a minute fact
MINUTE_MARGIN_S = 2.0  # an event this close to a minute edge gets no minute fact (its minute would be debatable)
FAR_APART_S = 20.0  # a gap this long between two event groups is described as "much later"


@dataclasses.dataclass(frozen=True)
class Group:
    """`count` consecutive events of one kind with the same attributes (None: the generator does not define it)."""
    kind: str
    count: int = 1
    pitch: str | None = None
    loudness: str | None = None
    length: str | None = None
    contour: str | None = None
    instrument: str | None = None


@dataclasses.dataclass(frozen=True)
class CaptionFacts:
    """What a caption may say about a clip. `groups`: the foreground, in time order; `background`: sorted names
    among 'beeps', 'hiss', 'silence', 'whistles'; `minutes`: the length of a recording of a minute or more (rounded),
    `exact_minutes` when it is that to half a second; `minute`: 0-based minute holding the single foreground event;
    `far_apart`: the foreground groups are at least FAR_APART_S apart."""
    groups: tuple[Group, ...]
    background: tuple[str, ...] = ()
    minutes: int | None = None
    exact_minutes: bool = False
    minute: int | None = None
    far_apart: bool = False
    skill: str | None = dataclasses.field(default=None, compare=False)  # provenance only


def _labels(event: dict) -> tuple:
    return tuple(event.get(a) for a in ("pitch", "loudness", "length", "contour", "instrument"))


def _merge(groups: Iterable[Group]) -> tuple[Group, ...]:
    """Adjacent groups with the same kind and attributes become one group (counts add)."""
    merged: list[Group] = []
    for g in groups:
        if merged and dataclasses.replace(merged[-1], count=g.count) == g:
            merged[-1] = dataclasses.replace(g, count=merged[-1].count + g.count)
        else:
            merged.append(g)
    return tuple(merged)


def caption_facts(record: dict) -> CaptionFacts:
    """The facts of a synthetic record, read from its 'events' (what the generator placed), not from its text."""
    events = record.get("events")
    if events is None:
        raise ValueError(f"{record.get('id', '<record>')}: no 'events' (only af2_jax.data.synthetic records have them)")
    rate = int(record.get("sample_rate", synthetic.SAMPLE_RATE))
    seconds = (np.asarray(record["waveform"]).shape[0] / rate if "waveform" in record
               else float(record["duration"]))
    events = sorted(events, key=lambda e: e["start"])
    targets = [e for e in events if e["role"] == "target"]
    if not targets:
        raise ValueError(f"{record.get('id', '<record>')}: no target event to describe")
    groups, spans = [], []  # spans: (first start, last end) per group, for the gaps
    for e in targets:
        g = Group(e["kind"], 1, *_labels(e))
        end = e["start"] + e["duration"]
        if groups and dataclasses.replace(groups[-1], count=1) == g:
            groups[-1] = dataclasses.replace(g, count=groups[-1].count + 1)
            spans[-1] = (spans[-1][0], end)
        else:
            groups.append(g)
            spans.append((e["start"], end))
    background = set()
    for e in events:
        if e["role"] == "target":
            continue
        background.add({"hiss": "hiss", "whistle": "whistles", "beep": "beeps"}.get(e["kind"], e["kind"] + "s"))
    minutes = exact = minute = None
    if seconds >= LONG_RECORDING_S - 0.5:
        minutes = max(1, int(round(seconds / 60.0)))
        exact = abs(seconds - 60.0 * minutes) < 0.5
        if len(targets) == 1:
            start, end = targets[0]["start"], targets[0]["start"] + targets[0]["duration"]
            m = int(start // 60.0)
            if start >= 60.0 * m + MINUTE_MARGIN_S and end <= 60.0 * (m + 1) - MINUTE_MARGIN_S:
                minute = m
    elif not background:
        background.add("silence")
    far = minutes is not None and len(spans) > 1 and all(
        b[0] - a[1] >= FAR_APART_S for a, b in itertools.pairwise(spans))
    return CaptionFacts(tuple(groups), tuple(sorted(background)), minutes, bool(exact), minute, far,
                        skill=record.get("skill"))


# ----------------------------------------------------------------------------------------------------- the grammar
NOUNS = {
    "beep": (("beep", "beeps"), ("bleep", "bleeps"), ("pip", "pips")),
    "tone": (("tone", "tones"), ("pure tone", "pure tones")),
    "noise": (("noise burst", "noise bursts"), ("burst of noise", "bursts of noise"), ("noise", "noises")),
    "whistle": (("whistle", "whistles"), ("chirp", "chirps")),
    "note": (("note", "notes"),),
}
ADJECTIVES = {
    "high": ("high", "high-pitched"), "low": ("low", "low-pitched"),
    "loud": ("loud",), "quiet": ("quiet", "faint", "soft"),
    "long": ("long", "sustained"), "short": ("short", "brief"),
    "rising": ("rising", "upward-sweeping"), "falling": ("falling", "downward-sweeping"),
}
ADJECTIVE_ORDER = ("loudness", "length", "pitch", "contour")  # "a loud high beep", "a long low tone"
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of")}
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
# Two event groups, {a} first and {b} second. Word order and temporal order differ in the last three on purpose: the
# same words in a different order mean the other order.
CONNECTIVES = ("{a} and then {b}", "{a}, then {b}", "{a} followed by {b}", "first {a}, then {b}", "{a} before {b}",
               "{b} after {a}", "{b}, preceded by {a}")
FAR_CONNECTIVES = ("{a} and, much later, {b}", "{a}, then much later {b}", "{a} long before {b}",
                   "{b} long after {a}")
PREFIXES = ("", "the sound of ", "audio of ", "you can hear ")
BACKGROUNDS = {
    ("silence",): ("in silence", "on a silent background"),
    ("hiss",): ("over steady hiss", "against a background hiss", "with hiss in the background"),
    ("whistles",): ("among scattered whistles", "with whistles here and there", "amid occasional whistles"),
    ("beeps", "hiss"): ("over hiss and scattered beeps", "amid hiss and occasional beeps"),
}
INSTRUMENT_FORMS = ("{c} {i} {n}", "{c} {n} on a {i}", "{c} {n} played on a {i}", "a {i} playing {c} {n}")


def _number(n: int) -> str:
    return NUMBERS[n] if 0 <= n < len(NUMBERS) else str(n)


def _count_words(n: int) -> tuple[str, ...]:
    return COUNT_WORDS.get(n, (_number(n),))


def _fix_articles(text: str) -> str:
    words = text.split(" ")
    for k in range(len(words) - 1):
        if words[k] == "a" and words[k + 1][:1] in "aeiou":
            words[k] = "an"
    return " ".join(words)


@functools.lru_cache(maxsize=4096)
def noun_phrases(group: Group) -> tuple[str, ...]:
    """Every way the grammar names a group: its count, all its attributes and its kind, always all three."""
    phrases = []
    for count in _count_words(group.count):
        if group.kind == "note" and group.instrument:
            noun = "note" if group.count == 1 else "notes"
            for form in INSTRUMENT_FORMS:
                phrases.append(form.format(c=count, i=group.instrument, n=noun))
            continue
        adjectives = [ADJECTIVES[getattr(group, a)] for a in ADJECTIVE_ORDER if getattr(group, a) is not None]
        for words in itertools.product(*adjectives):
            for singular, plural in NOUNS[group.kind]:
                phrases.append(" ".join([count, *words, singular if group.count == 1 else plural]))
    return tuple(dict.fromkeys(_fix_articles(p) for p in phrases))


def _pitch_pair(groups: tuple[Group, ...]) -> tuple[str, ...]:
    """Extra paraphrases of two single beeps or tones that differ only in pitch: 'two tones, rising in pitch'."""
    if len(groups) != 2:
        return ()
    a, b = groups
    if not (a.kind == b.kind and a.kind in ("beep", "tone") and a.count == b.count == 1 and a.pitch and b.pitch
            and a.pitch != b.pitch and dataclasses.replace(a, pitch=b.pitch) == b):
        return ()
    rising = a.pitch == "low"
    direction, comparative = ("rising", "higher") if rising else ("falling", "lower")
    out = []
    rest = [ADJECTIVES[getattr(a, x)] for x in ADJECTIVE_ORDER if x != "pitch" and getattr(a, x) is not None]
    for words in itertools.product(*rest):
        for singular, plural in NOUNS[a.kind]:
            pair = " ".join(["two", *words, plural])
            one = " ".join(["a", *words, singular])
            out += [f"{pair}, {direction} in pitch", f"{pair}, the second {comparative} than the first",
                    f"{one} and then a {comparative} one"]
    return tuple(_fix_articles(p) for p in out)


def _time_phrases(minute: int | None) -> tuple[str, ...]:
    if minute is None:
        return ("",)
    return (f" in the {ORDINALS[minute]} minute", f" during the {ORDINALS[minute]} minute",
            f" in minute {_number(minute + 1)}")


@functools.lru_cache(maxsize=4096)
def core_phrases(groups: tuple[Group, ...], far_apart: bool, minute: int | None) -> tuple[str, ...]:
    """The part of a caption that states the foreground facts (groups, their order, the minute)."""
    nps = [noun_phrases(g) for g in groups]
    if len(groups) == 1:
        sequences = list(nps[0])
    elif len(groups) == 2:
        connectives = CONNECTIVES + (FAR_CONNECTIVES if far_apart else ())
        sequences = [c.format(a=a, b=b) for c in connectives for a in nps[0] for b in nps[1]]
        sequences += _pitch_pair(groups)
    else:  # not produced by the generator; kept unambiguous with one ordered form
        sequences = [", then ".join(parts) for parts in itertools.product(*nps)]
    return tuple(dict.fromkeys(s + t for s in sequences for t in _time_phrases(minute)))


def _context_phrases(facts: CaptionFacts) -> tuple[str, ...]:
    if facts.minutes is None:
        return ("",)
    n = _number(facts.minutes)
    unit = "minute" if facts.minutes == 1 else "minutes"
    if facts.exact_minutes:
        forms = (f"of a {n}-minute recording",) if facts.minute is not None else (
            f"in a {n}-minute recording", f"in {n} {unit} of audio")
    else:
        forms = (f"of a recording of about {n} {unit}",) if facts.minute is not None else (
            f"in a recording of about {n} {unit}", f"in about {n} {unit} of audio")
    return ("",) + tuple(" " + f for f in forms)


def _background_phrases(facts: CaptionFacts) -> tuple[str, ...]:
    if not facts.background:
        return ("",)
    forms = BACKGROUNDS.get(facts.background) or (
        "with " + " and ".join(facts.background) + " in the background",)
    return ("",) + tuple(" " + f for f in forms)


def _slots(facts: CaptionFacts) -> tuple[tuple[str, ...], ...]:
    """A caption is one choice from each slot, concatenated: prefix, core, recording length, background."""
    return (PREFIXES, core_phrases(facts.groups, facts.far_apart, facts.minute), _context_phrases(facts),
            _background_phrases(facts))


def _compose(parts: Sequence[str]) -> str:
    return _fix_articles("".join(parts))


def num_captions(facts: CaptionFacts) -> int:
    """How many slot combinations the grammar has for `facts` (an upper bound on distinct captions)."""
    return math.prod(len(s) for s in _slots(facts))


def all_captions(facts: CaptionFacts) -> set[str]:
    """Every caption the grammar can write for `facts` (tests and docs; up to ~50k strings for long clips)."""
    return {_compose(parts) for parts in itertools.product(*_slots(facts))}


def _sample(facts: CaptionFacts, rng: np.random.Generator, m: int, exclude=frozenset(),
            exclude_cores=frozenset()) -> list[str]:
    """Up to `m` distinct captions of `facts`, uniformly over slot combinations, none in `exclude` and none whose
    core phrase is in `exclude_cores`."""
    if m <= 0:
        return []
    slots = _slots(facts)
    radix = [len(s) for s in slots]
    total = math.prod(radix)
    out: list[str] = []

    def take(indices) -> bool:
        for index in indices:
            parts, index = [], int(index)
            for slot, size in zip(reversed(slots), reversed(radix)):  # mixed radix, last slot fastest
                index, k = divmod(index, size)
                parts.append(slot[k])
            parts.reverse()
            if parts[1] in exclude_cores:
                continue
            text = _compose(parts)
            if text not in exclude and text not in out:
                out.append(text)
                if len(out) == m:
                    return True
        return False

    picks = rng.choice(total, size=min(total, 2 * m + 8), replace=False)
    if not take(picks) and total > len(picks):  # rare: many collisions; walk everything in a seeded order
        take(rng.permutation(total))
    return out


def positive_captions(facts: CaptionFacts, rng: np.random.Generator, m: int) -> list[str]:
    """`m` distinct paraphrases (fewer only when the grammar has fewer), deterministic given `rng`'s state."""
    return _sample(facts, rng, m)


# --------------------------------------------------------------------------------------------------- the negatives
def _present_families(facts: CaptionFacts) -> set:
    return {FAMILY[g.kind] for g in facts.groups} | {BACKGROUND_FAMILY.get(b) for b in facts.background}


def negative_facts(facts: CaptionFacts) -> list[tuple[str, CaptionFacts]]:
    """Every one-change variant of `facts` that is false of the clip, as (type, facts), types in NEGATIVE_TYPES:
    order (two adjacent different groups swapped), attribute (high/low, loud/quiet, long/short, rising/falling, the
    instrument), time (another minute), count (another number of events in one group), kind (a group becomes a
    sound of a family the clip has none of)."""
    groups = facts.groups
    out: list[tuple[str, CaptionFacts]] = []

    def add(kind: str, new_groups) -> None:
        new = dataclasses.replace(facts, groups=_merge(new_groups))
        if new != facts and all(new != f for _, f in out):
            out.append((kind, new))

    for i in range(len(groups) - 1):
        if groups[i] != groups[i + 1]:
            add("order", groups[:i] + (groups[i + 1], groups[i]) + groups[i + 2:])
    for i, g in enumerate(groups):
        for attribute in ATTRIBUTES[g.kind]:
            value = getattr(g, attribute)
            if value is None:
                continue
            if attribute == "pitch" and any(h is not g and h.pitch == OPPOSITE[value] for h in groups):
                continue  # a relative high/low pair: flipping one would make the pitches equal, not clearly false
            others = ([v for v in synthetic.INSTRUMENTS if v != value] if attribute == "instrument"
                      else [OPPOSITE[value]])
            for other in others:
                add("attribute", groups[:i] + (dataclasses.replace(g, **{attribute: other}),) + groups[i + 1:])
    if facts.minute is not None:
        for m in range(max(5, facts.minutes or 0)):
            if m != facts.minute:
                new = dataclasses.replace(facts, minute=m)
                if all(new != f for _, f in out):
                    out.append(("time", new))
    for i, g in enumerate(groups):
        for c in range(1, max(4, g.count + 1) + 1):
            if c != g.count:
                add("count", groups[:i] + (dataclasses.replace(g, count=c),) + groups[i + 1:])
    present = _present_families(facts)
    for i, g in enumerate(groups):
        for kind in ("beep", "noise", "whistle"):
            if FAMILY[kind] in present:
                continue
            kept = {a: getattr(g, a) for a in ATTRIBUTES[kind]}
            add("kind", groups[:i] + (Group(kind, g.count, **kept),) + groups[i + 1:])
    return out


def _truth_cores(facts: CaptionFacts) -> frozenset:
    return frozenset(core_phrases(facts.groups, facts.far_apart, facts.minute))


def negative_captions(facts: CaptionFacts, rng: np.random.Generator, n: int, *, types: Sequence[str] | None = None,
                      with_types: bool = False) -> list:
    """`n` distinct captions that are false of the clip (fewer only when the grammar runs out). Types are taken in
    turns, hardest first (NEGATIVE_TYPES order: order, attribute, time, count, kind), each type's variants in a
    seeded order; when there are fewer false variants than `n`, further wordings of them follow. `types` restricts
    the types; `with_types` returns (type, caption) pairs."""
    types = tuple(types) if types is not None else NEGATIVE_TYPES
    unknown = [t for t in types if t not in NEGATIVE_TYPES]
    if unknown:
        raise ValueError(f"unknown negative types {unknown} (known: {NEGATIVE_TYPES})")
    if n <= 0:
        return []
    by_type = {t: [] for t in types}
    for kind, variant in negative_facts(facts):
        if kind in by_type:
            by_type[kind].append(variant)
    for t in types:
        by_type[t] = [by_type[t][k] for k in rng.permutation(len(by_type[t]))]
    ordered = [(t, lst[k]) for k in range(max((len(v) for v in by_type.values()), default=0))
               for t, lst in by_type.items() if k < len(lst)]
    if not ordered:
        return []
    truth = _truth_cores(facts)  # a negative's wording of the facts must never be one of the truth's
    chosen: list[tuple[str, str]] = []
    texts: set[str] = set()
    while len(chosen) < n:  # passes: one new wording per variant per pass
        before = len(chosen)
        for kind, variant in ordered:
            for text in _sample(variant, rng, 1, exclude=texts, exclude_cores=truth):
                chosen.append((kind, text))
                texts.add(text)
            if len(chosen) == n:
                break
        if len(chosen) == before:
            break
    return chosen if with_types else [t for _, t in chosen]


def composition_test(facts: CaptionFacts, rng: np.random.Generator | None = None) -> tuple[str, str] | None:
    """(true caption, the same words with two adjacent event groups in swapped order), or None when the clip has
    no order (fewer than two groups). The retrieval check: does the audio score the first above the second? With
    `rng` None the plainest wording ('a beep and then a noise burst'), else a seeded one; both use the same words."""
    groups = facts.groups
    pair = next((i for i in range(len(groups) - 1) if groups[i] != groups[i + 1]), None)
    if pair is None:
        return None
    nps = [noun_phrases(g) for g in groups]
    pick = (lambda k: 0) if rng is None else (lambda k: int(rng.integers(k)))
    words = [p[pick(len(p))] for p in nps]
    connectives = CONNECTIVES + (FAR_CONNECTIVES if facts.far_apart else ())
    connective = connectives[pick(len(connectives))]
    time = _time_phrases(facts.minute)[0]

    def say(parts):
        if len(parts) == 2:
            return _fix_articles(connective.format(a=parts[0], b=parts[1]) + time)
        return _fix_articles(", then ".join(parts) + time)

    swapped = list(words)
    swapped[pair], swapped[pair + 1] = swapped[pair + 1], swapped[pair]
    return say(words), say(swapped)


# ------------------------------------------------------------------------------------------------------ the source
CAPTION_STREAM = 7919  # appended to the generator's seed triple: the captions' own random stream


class SyntheticCaptionSource:
    """Random-access synthetic clips with captions: record i = the generator's example i (same waveform) with
    {'captions': M paraphrases, 'negatives': N hard negatives, 'composition': [true, swapped] or None}. The captions
    are a pure function of (seed, split, i); the pipeline samples from them (af2_jax.data.clap_pipeline)."""

    def __init__(self, split: str = "train", num_examples: int = 10000, seed: int = 0,
                 skills=synthetic.SHORT_SKILLS, num_positives: int = 4, num_negatives: int = 4):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if num_positives < 1 or num_negatives < 0:
            raise ValueError(f"need num_positives >= 1 and num_negatives >= 0, got {num_positives}, {num_negatives}")
        self.split, self.num_examples, self.seed = split, int(num_examples), int(seed)
        self.skills = tuple(skills)
        self.num_positives, self.num_negatives = int(num_positives), int(num_negatives)
        self[0]  # validate the split and skills now, not in a worker

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"synthetic caption index {index} out of range [0, {self.num_examples})")
        record = synthetic.generate(self.seed, self.split, index, self.skills, mcq_probability=0.0)
        facts = caption_facts(record)
        rng = np.random.default_rng([self.seed, synthetic.SPLIT_CODES[self.split], int(index), CAPTION_STREAM])
        pair = composition_test(facts)
        return {
            "id": record["id"],
            "waveform": record["waveform"],
            "sample_rate": record["sample_rate"],
            "captions": positive_captions(facts, rng, self.num_positives),
            "negatives": negative_captions(facts, rng, self.num_negatives),
            "composition": list(pair) if pair else None,
            "skill": record["skill"],
            "events": record["events"],  # the evaluation's zero-shot classes are built from them
            "start": 0.0,
            "duration": record["duration"],
            "dataset": "synthetic_captions",
        }

    def __repr__(self) -> str:
        return (f"SyntheticCaptionSource(split={self.split!r}, n={self.num_examples}, seed={self.seed}, "
                f"skills={self.skills}, M={self.num_positives}, N={self.num_negatives})")


def vocabulary_texts() -> list[str]:
    """Every word the grammar writes (also with a trailing comma), for training a word-level ClapTokenizer."""
    pieces = [w for forms in NOUNS.values() for pair in forms for w in pair]
    pieces += [w for forms in ADJECTIVES.values() for w in forms] + list(NUMBERS) + list(ORDINALS)
    pieces += [w for forms in COUNT_WORDS.values() for w in forms] + ["an"] + list(synthetic.INSTRUMENTS)
    pieces += [t.format(a="", b="", c="", i="", n="") for t in CONNECTIVES + FAR_CONNECTIVES + INSTRUMENT_FORMS]
    pieces += list(PREFIXES) + [f for forms in BACKGROUNDS.values() for f in forms]
    pieces += ["rising falling in pitch the second higher lower than first one and then",
               "in during minute of a recording about audio with background"]
    pieces += [f"{n}-minute" for n in NUMBERS] + ["minutes", "minute"]
    words = sorted({w.strip(",") for p in pieces for w in p.split() if w.strip(",")})
    return [" ".join(words), " ".join(w + "," for w in words)]


@functools.lru_cache(maxsize=None)
def synthetic_caption_tokenizer():
    """A word-level ClapTokenizer (af2_jax.clap_tokenizer) of every word the grammar writes (cached per process)."""
    from af2_jax.clap_tokenizer import train_tokenizer

    return train_tokenizer(vocabulary_texts(), kind="wordlevel")
