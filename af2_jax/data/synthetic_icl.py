"""Synthetic skills that need several audios or several turns (docs/ICL.md), for the in-context-learning demo
(launch/icl_demo.py):

- **made-up names** (in-context learning): short clips of five sound classes (beep, noise, tone, whistle, buzz). In
  each episode every class gets a random nonsense name (`NAMES`, drawn afresh per episode), the examples show
  clip -> its class's name, and the query asks the name of its clip's class. The names mean nothing outside the
  episode, so the answer can only come from the examples: a model without them is at 1/len(NAMES);
- **one more than that** (multi-turn chat): a clip with 1-3 beeps and 1-3 noise bursts; round 1 asks how many
  beeps, or how many noise bursts; round 2 asks "and one more than that?". Round 2's answer depends on which
  question round 1 asked, so it needs the dialogue's history.

Clip `i` of a split is a pure function of (seed, split, i), numpy only, like af2_jax/data/synthetic.py (whose sound
makers it reuses). The clips are written as WAV files with JSONL manifests so that the retrieval index, the
training pipeline and launch/infer.py read them like any dataset.
"""
from __future__ import annotations

import itertools
import json
import pathlib
from typing import Sequence

import numpy as np

from af2_jax.data import synthetic as base

SAMPLE_RATE = base.SAMPLE_RATE
CLASSES = ("beep", "noise", "tone", "whistle", "buzz")
# Nonsense names, two consonant-vowel syllables: no meaning the model could bring from elsewhere.
NAMES = tuple(a + b for a, b in itertools.product(("ba", "do", "fe", "gu", "ki", "lo"), ("ri", "mo", "sa", "tu")))
NAME_PROMPT = "what is this sound called?"
SPLIT_CODES = {"train": 10, "test": 11}  # apart from synthetic.py's 0/1: never the same generator stream
CHAT_SPLIT_CODES = {"train": 20, "test": 21}
COUNT_QUESTIONS = {"beep": "how many beeps are there?", "noise": "how many noise bursts are there?"}
FOLLOW_UP = "and one more than that?"
MAX_COUNT = 3


def _split_code(codes: dict, split: str) -> int:
    if split not in codes:
        raise ValueError(f"split must be one of {sorted(codes)}, got {split!r}")
    return codes[split]


def _class_sound(rng: np.random.Generator, kind: str) -> list[tuple[np.ndarray, float]]:
    """(event, gain) pairs of one class, with enough variety that no two clips are the same."""
    if kind == "beep":  # 2-4 short pips around 1 kHz
        freq = float(rng.uniform(800.0, 1300.0))
        return [(base.tone(freq, float(rng.uniform(0.1, 0.2))), 1.0) for _ in range(int(rng.integers(2, 5)))]
    if kind == "noise":
        return [(base.noise_burst(rng, float(rng.uniform(0.4, 1.0))), 0.8)]
    if kind == "tone":  # one steady low note
        return [(base.tone(float(rng.uniform(200.0, 450.0)), float(rng.uniform(0.8, 1.5))), 1.0)]
    if kind == "whistle":
        return [(base.whistle(float(rng.uniform(0.5, 1.0))), 1.0)]
    if kind == "buzz":  # a low sawtooth: harmonics up to 7.5 kHz
        return [(base.tone(float(rng.uniform(100.0, 180.0)), float(rng.uniform(0.6, 1.2)), "sawtooth"), 1.0)]
    raise ValueError(f"unknown class {kind!r}")


def class_clip(seed: int, split: str, index: int) -> tuple[np.ndarray, str]:
    """Clip `index` of `split` (2-3 s, 16 kHz, peak 0.9, faint hiss) and its class (round robin over CLASSES)."""
    kind = CLASSES[index % len(CLASSES)]
    rng = np.random.default_rng([int(seed), _split_code(SPLIT_CODES, split), int(index)])
    clip_s = float(rng.uniform(2.0, 3.0))
    clip = float(rng.uniform(0.0, 0.02)) * rng.uniform(-1.0, 1.0, int(clip_s * SAMPLE_RATE))
    events = _class_sound(rng, kind)
    lengths = [e.size / SAMPLE_RATE for e, _ in events]
    starts = base._spaced_starts(rng, len(events), clip_s, max(lengths), 0.15, margin_s=0.1)
    for (event, gain), start in zip(events, starts):
        base._place(clip, event, start, gain)
    return base._finish(clip), kind


def count_clip(seed: int, split: str, index: int) -> tuple[np.ndarray, dict[str, int]]:
    """A 4-7 s clip with 1-3 beeps and 1-3 noise bursts in random order; their counts."""
    rng = np.random.default_rng([int(seed), _split_code(CHAT_SPLIT_CODES, split), int(index)])
    counts = {"beep": int(rng.integers(1, MAX_COUNT + 1)), "noise": int(rng.integers(1, MAX_COUNT + 1))}
    kinds = ["beep"] * counts["beep"] + ["noise"] * counts["noise"]
    rng.shuffle(kinds)
    clip_s = float(rng.uniform(4.0, 7.0))
    clip = np.zeros(int(clip_s * SAMPLE_RATE))
    for kind, start in zip(kinds, base._spaced_starts(rng, len(kinds), clip_s, 0.3, 0.3)):
        event = base.tone(base.BEEP_HZ, 0.25) if kind == "beep" else base.noise_burst(rng, 0.3)
        base._place(clip, event, start, 1.0 if kind == "beep" else 0.8)
    return base._finish(clip), counts


def chat_dialogue(counts: dict[str, int], asked: str) -> list[list[str]]:
    """Round 1 asks the count of `asked` ('beep' | 'noise'); round 2 asks one more than that."""
    n = counts[asked]
    return [[COUNT_QUESTIONS[asked], base.NUMBER_WORDS[n - 1]], [FOLLOW_UP, base.NUMBER_WORDS[n]]]


def episode_names(rng: np.random.Generator) -> dict[str, str]:
    """A fresh class -> nonsense name assignment (distinct names)."""
    picked = rng.choice(len(NAMES), size=len(CLASSES), replace=False)
    return {kind: NAMES[int(i)] for kind, i in zip(CLASSES, picked)}


def episode_record(entries: Sequence[dict], shots: Sequence[int], query: dict, names: dict[str, str], *,
                   kind: str = "similar", record_id: str) -> dict:
    """An interleaved record: the examples (entries rows `shots`) first, then the query, each answered by the name
    of its class (entry 'skill' holds the class)."""
    items = [entries[i] for i in shots] + [query]
    return {"id": record_id, "audio": [e["audio"] for e in items], "prompt": [NAME_PROMPT] * len(items),
            "answer": [names[e["skill"]] for e in items], "interleaved": kind}


def write_class_clips(directory, split: str, count: int, *, seed: int = 0) -> list[dict]:
    """Writes `count` clips of `split` as WAV files under directory/split/ and a JSONL manifest
    directory/<split>.jsonl of {id, audio, prompt, answer (the class), skill (the class)}; returns its rows."""
    import soundfile

    folder = pathlib.Path(directory) / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        wave, kind = class_clip(seed, split, index)
        path = folder / f"{split}-{index:05d}.wav"
        soundfile.write(str(path), wave, SAMPLE_RATE, subtype="PCM_16")
        rows.append({"id": f"{split}-{index}", "audio": str(path.absolute()), "prompt": NAME_PROMPT,
                     "answer": kind, "skill": kind})
    _write_jsonl(pathlib.Path(directory) / f"{split}.jsonl", rows)
    return rows


def write_chat_clips(directory, split: str, count: int, *, seed: int = 0) -> list[dict]:
    """Writes `count` counting clips as WAV files under directory/chat-split/ and returns one chat row per clip
    (round 1 asks about beeps for even clips, noise bursts for odd ones), also written to
    directory/chat-<split>.jsonl; each row keeps its 'counts' and 'asked'."""
    import soundfile

    folder = pathlib.Path(directory) / f"chat-{split}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        wave, counts = count_clip(seed, split, index)
        path = folder / f"chat-{split}-{index:05d}.wav"
        soundfile.write(str(path), wave, SAMPLE_RATE, subtype="PCM_16")
        asked = ("beep", "noise")[index % 2]
        rows.append({"id": f"chat-{split}-{index}", "audio": str(path.absolute()),
                     "dialogue": chat_dialogue(counts, asked), "counts": counts, "asked": asked})
    _write_jsonl(pathlib.Path(directory) / f"chat-{split}.jsonl", rows)
    return rows


def _write_jsonl(path: pathlib.Path, rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def vocabulary_texts() -> list[str]:
    """Every text the two skills produce, in both formats, for a tiny tokenizer in which each name is one token."""
    from af2_jax import tokenizer as tok

    texts = [NAME_PROMPT, FOLLOW_UP, *COUNT_QUESTIONS.values(), *base.NUMBER_WORDS, *CLASSES, *NAMES]
    texts += [tok.ICL_INTRO["similar"], tok.ICL_INTRO["random"], tok.CHAT_PREFIX, "user: ", " \nassistant: "]
    texts += [f"{NAME_PROMPT}{name}" for name in NAMES] + [f" {name}" for name in NAMES]
    return texts


def icl_tokenizer(vocab_size: int = 400):
    """The demo's tiny BPE tokenizer (deterministic); `check_single_token_names` verifies what it promises."""
    from af2_jax.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(vocabulary_texts(), vocab_size=vocab_size)


def check_single_token_names(tokenizer) -> None:
    """Each name must be one token: the query's answer is then one token to copy from the examples."""
    long = [n for n in NAMES if len(tokenizer.encode(n)) != 1]
    if long:
        raise ValueError(f"names that are not one token: {long}")
