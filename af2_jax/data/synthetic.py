"""The embedded synthetic dataset: 16 kHz clips with short question/answer pairs that teach AF2's skills.

Every stage's tiny preset trains on it, so training needs no download. Example `i` of split `s` is a pure function
of (seed, s, i): its random generator is seeded with that triple, and train/test use different split codes, so the
two splits never share a generator stream (or a waveform). Numpy only and vectorised: a 5-minute clip takes tens of
milliseconds.

The tasks are kept learnable by a tiny model: few, well separated events, large pitch gaps (>= 2x), answers from
small closed sets (each record lists them in 'choices'), and events that stand out in a 64-band log-mel
(50-8000 Hz). Skills are documented in docs/DATA.md.
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable

import numpy as np

SAMPLE_RATE = 16000
SPLIT_CODES = {"train": 0, "test": 1}

SHORT_SKILLS = ("count", "order", "pitch", "timbre", "loudness", "duration", "caption")
LONG_SKILLS = ("long_order", "long_pitch", "long_count", "long_when")
ALL_SKILLS = SHORT_SKILLS + LONG_SKILLS

NUMBER_WORDS = ("one", "two", "three", "four")
ORDINAL_WORDS = ("first", "second", "third", "fourth", "fifth")
INSTRUMENTS = ("flute", "clarinet", "violin", "guitar")  # sine, odd harmonics, sawtooth, plucked decay
MCQ_INTRO = " choose the correct option from the following options:"
MCQ_PROBABILITY = 0.3

BEEP_HZ = 1000.0
HIGH_BEEP_HZ, LOW_BEEP_HZ = 2500.0, 400.0


# ----------------------------------------------------------------------------------------------------------- sounds
def _time(seconds: float) -> np.ndarray:
    return np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE


def _envelope(n: int, fade: int = 160) -> np.ndarray:
    """Linear 10 ms fades: no clicks, so an event's energy stays in its own mel bands."""
    env = np.ones(n)
    fade = min(fade, n // 2)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        env[:fade] = ramp
        env[n - fade:] = ramp[::-1]
    return env


def tone(freq: float, seconds: float, timbre: str = "sine") -> np.ndarray:
    """A note of `freq` Hz with a synthetic timbre, peak about 1."""
    t = _time(seconds)
    phase = 2 * np.pi * freq * t
    if timbre == "sine":
        x = np.sin(phase)
    elif timbre == "square":  # odd harmonics 1/k, band-limited below 7.5 kHz
        ks = np.arange(1, int(7500 // freq) + 1, 2)
        x = (np.sin(np.outer(ks, phase)) / ks[:, None]).sum(0)
    elif timbre == "sawtooth":  # all harmonics 1/k
        ks = np.arange(1, int(7500 // freq) + 1)
        x = (np.sin(np.outer(ks, phase)) / ks[:, None]).sum(0)
    elif timbre == "pluck":  # harmonics with fast, frequency-dependent exponential decay
        ks = np.arange(1, min(8, int(7500 // freq)) + 1)
        decay = np.exp(-np.outer(3.0 + 2.0 * ks, t))
        x = (np.sin(np.outer(ks, phase)) * decay / ks[:, None]).sum(0)
    else:
        raise ValueError(f"unknown timbre {timbre!r}")
    x = x / max(np.abs(x).max(), 1e-9)
    return x * _envelope(x.size)


def noise_burst(rng: np.random.Generator, seconds: float) -> np.ndarray:
    x = rng.uniform(-1.0, 1.0, int(round(seconds * SAMPLE_RATE)))
    return x * _envelope(x.size)


def whistle(seconds: float = 0.8) -> np.ndarray:
    """A rising chirp 1.5 -> 3.5 kHz: unlike any steady beep."""
    t = _time(seconds)
    f0, f1 = 1500.0, 3500.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * seconds))
    return np.sin(phase) * _envelope(t.size)


def _place(clip: np.ndarray, event: np.ndarray, start_s: float, gain: float = 1.0) -> None:
    start = int(round(start_s * SAMPLE_RATE))
    end = min(clip.size, start + event.size)
    clip[start:end] += gain * event[: end - start]


def _spaced_starts(rng, count: int, clip_s: float, event_s: float, gap_s: float, margin_s: float = 0.3):
    """`count` event start times in [margin, clip-margin-event] with at least `gap_s` of silence between events."""
    slack = clip_s - 2 * margin_s - count * event_s - (count - 1) * gap_s
    if slack < 0:
        raise ValueError("clip too short for the events")
    # Spread the slack over count+1 gaps at random: uniform spacing without rejection sampling.
    cuts = np.sort(rng.uniform(0.0, slack, count))
    offsets = cuts - np.concatenate([[0.0], cuts[:-1]])
    starts, t = [], margin_s
    for k in range(count):
        t += offsets[k]
        starts.append(t)
        t += event_s + gap_s
    return starts


def _log(log: list, kind: str, start_s: float, seconds: float, role: str = "target", **labels) -> None:
    """Note one placed sound in the record's event list (what af2_jax.data.captions describes). Never draws from
    the generator, so logging changes no waveform, prompt or answer."""
    log.append({"kind": kind, "start": float(start_s), "duration": float(seconds), "role": role, **labels})


def _finish(clip: np.ndarray) -> np.ndarray:
    peak = np.abs(clip).max()
    return (clip / peak * 0.9 if peak > 0 else clip).astype(np.float32)


def _mcq(rng, prompt: str, answer: str, choices: tuple[str, ...], probability: float):
    """With `probability`, turn the question into AF2's multiple-choice style; the answer becomes '(x) ...'."""
    if rng.random() >= probability:
        return prompt, answer, list(choices)
    order = [choices[j] for j in rng.permutation(len(choices))]
    letters = "abcdefgh"
    options = [f"({letters[k]}) {c}" for k, c in enumerate(order)]
    return prompt + MCQ_INTRO + "\n" + "\n".join(options), options[order.index(answer)], options


# ----------------------------------------------------------------------------------------------------------- skills
def _count(rng, log):
    n = int(rng.integers(1, 5))
    clip_s = float(rng.uniform(4.0, 9.0))
    clip = np.zeros(int(clip_s * SAMPLE_RATE))
    for s in _spaced_starts(rng, n, clip_s, 0.25, 0.5):
        _place(clip, tone(BEEP_HZ, 0.25), s)
        _log(log, "beep", s, 0.25, freq=BEEP_HZ)
    return clip, "how many beeps are there?", NUMBER_WORDS[n - 1], NUMBER_WORDS


def _beep_and_noise(rng, clip: np.ndarray, starts_of: Callable, log: list):
    """Order's events placed in `clip`: a beep and a noise burst, in random order, at the two starts `starts_of(rng)`
    draws; with order's question, answer and choices. Shared by order and long_order."""
    beep_first = bool(rng.integers(2))
    first, second = starts_of(rng)
    beep_at, noise_at = (first, second) if beep_first else (second, first)
    _place(clip, tone(BEEP_HZ, 0.5), beep_at)
    _place(clip, noise_burst(rng, 0.5), noise_at, 0.8)
    _log(log, "beep", beep_at, 0.5, freq=BEEP_HZ)
    _log(log, "noise", noise_at, 0.5, gain=0.8)
    named = ("the beep", "the noise") if rng.integers(2) else ("the noise", "the beep")
    prompt = f"which came first, {named[0]} or {named[1]}?"
    answer = "the beep" if beep_first else "the noise"
    return clip, prompt, answer, ("the beep", "the noise")


def _order(rng, log):
    clip_s = float(rng.uniform(3.0, 8.0))
    return _beep_and_noise(rng, np.zeros(int(clip_s * SAMPLE_RATE)),
                           lambda r: _spaced_starts(r, 2, clip_s, 0.5, 0.6), log)


def _two_tones(rng, clip: np.ndarray, starts_of: Callable, log: list):
    """Pitch's events placed in `clip`: a low and a high tone (>= 2.5x: more than an octave apart), in random order,
    at the two starts `starts_of(rng)` draws; with pitch's question, answer and choices. Shared by pitch and
    long_pitch."""
    low = float(rng.uniform(250.0, 500.0))
    high = low * float(rng.uniform(2.5, 4.0))
    higher = bool(rng.integers(2))
    for freq, start in zip((low, high) if higher else (high, low), starts_of(rng)):
        _place(clip, tone(freq, 0.6), start)
        _log(log, "tone", start, 0.6, freq=freq, pitch="high" if freq == high else "low")  # relative to the other
    prompt = "is the second tone higher or lower than the first?"
    return clip, prompt, "higher" if higher else "lower", ("higher", "lower")


def _pitch(rng, log):
    clip_s = float(rng.uniform(2.5, 6.0))
    return _two_tones(rng, np.zeros(int(clip_s * SAMPLE_RATE)), lambda r: _spaced_starts(r, 2, clip_s, 0.6, 0.4),
                      log)


def _timbre(rng, log):
    k = int(rng.integers(len(INSTRUMENTS)))
    timbre = ("sine", "square", "sawtooth", "pluck")[k]
    clip_s = float(rng.uniform(3.5, 7.0))
    clip = np.zeros(int(clip_s * SAMPLE_RATE))
    notes = int(rng.integers(2, 4))
    for s in _spaced_starts(rng, notes, clip_s, 0.7, 0.2):
        freq = float(rng.uniform(220.0, 660.0))
        _place(clip, tone(freq, 0.7, timbre), s)
        _log(log, "note", s, 0.7, freq=freq, instrument=INSTRUMENTS[k])
    return clip, "which instrument plays?", INSTRUMENTS[k], INSTRUMENTS


def _loudness(rng, log):
    # The pipeline peak-normalises every clip (as the reference does), so loudness is judged against a steady
    # background hiss: a loud beep towers over it, a quiet one barely clears it.
    clip_s = float(rng.uniform(3.0, 7.0))
    n = int(clip_s * SAMPLE_RATE)
    clip = 0.05 * rng.uniform(-1.0, 1.0, n)
    loud = bool(rng.integers(2))
    (s,) = _spaced_starts(rng, 1, clip_s, 1.0, 0.0)
    _place(clip, tone(BEEP_HZ, 1.0), s, 0.9 if loud else 0.08)
    _log(log, "hiss", 0.0, n / SAMPLE_RATE, role="background", gain=0.05)
    _log(log, "beep", s, 1.0, freq=BEEP_HZ, gain=0.9 if loud else 0.08, loudness="loud" if loud else "quiet")
    return clip, "is the beep loud or quiet?", "loud" if loud else "quiet", ("loud", "quiet")


def _duration(rng, log):
    clip_s = float(rng.uniform(5.0, 8.0))
    clip = np.zeros(int(clip_s * SAMPLE_RATE))
    long = bool(rng.integers(2))
    length = float(rng.uniform(2.5, 3.5)) if long else float(rng.uniform(0.2, 0.4))
    (s,) = _spaced_starts(rng, 1, clip_s, length, 0.0)
    freq = float(rng.uniform(500.0, 1500.0))
    _place(clip, tone(freq, length), s)
    _log(log, "tone", s, length, freq=freq, length="long" if long else "short")
    return clip, "is the tone long or short?", "long" if long else "short", ("long", "short")


def _caption_text(n: int, high: bool, noise: bool) -> str:
    beeps = "beep" if n == 1 else "beeps"
    return f"{NUMBER_WORDS[n - 1]} {'high' if high else 'low'} {beeps}" + (", then noise" if noise else "")


CAPTIONS = tuple(_caption_text(n, h, z) for n in (1, 2, 3) for h in (True, False) for z in (True, False))
CAPTION_PROMPTS = ("describe the audio.", "caption the audio.")


def _caption(rng, log):
    n, high, noise = int(rng.integers(1, 4)), bool(rng.integers(2)), bool(rng.integers(2))
    clip_s = float(rng.uniform(5.0, 9.0))
    clip = np.zeros(int(clip_s * SAMPLE_RATE))
    starts = _spaced_starts(rng, n + int(noise), clip_s, 0.5, 0.4)
    for s in starts[:n]:
        _place(clip, tone(HIGH_BEEP_HZ if high else LOW_BEEP_HZ, 0.3), s)
        _log(log, "beep", s, 0.3, freq=HIGH_BEEP_HZ if high else LOW_BEEP_HZ, pitch="high" if high else "low")
    if noise:
        _place(clip, noise_burst(rng, 0.5), starts[-1], 0.8)
        _log(log, "noise", starts[-1], 0.5, gain=0.8)
    prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
    return clip, prompt, _caption_text(n, high, noise), CAPTIONS


LONG_SECONDS = 300.0  # the long skills' recordings: 5 minutes, i.e. 30 windows, as the paper's stage 3
LONG_GAP_S = 30.0  # long_order / long_pitch: events minutes apart, not seconds


def _long_recording(rng, log) -> np.ndarray:
    """5 minutes of silence with 2-8 whistles, a sound no short skill uses, as distractors."""
    clip = np.zeros(int(LONG_SECONDS * SAMPLE_RATE))
    for s in rng.uniform(1.0, LONG_SECONDS - 2.0, int(rng.integers(2, 9))):
        _place(clip, whistle(), float(s))
        _log(log, "whistle", float(s), 0.8, role="distractor", contour="rising")
    return clip


def _far_apart_starts(rng) -> tuple[float, float]:
    """Two event starts in a long recording, the second at least LONG_GAP_S after the first."""
    first = float(rng.uniform(1.0, LONG_SECONDS - 2.0 - LONG_GAP_S))
    return first, float(rng.uniform(first + LONG_GAP_S, LONG_SECONDS - 2.0))


def _long_order(rng, log):
    """The order skill's beep and noise, minutes apart in 5 minutes: which came first?"""
    return _beep_and_noise(rng, _long_recording(rng, log), _far_apart_starts, log)


def _long_pitch(rng, log):
    """The pitch skill's two tones, minutes apart in 5 minutes: is the second higher or lower?"""
    return _two_tones(rng, _long_recording(rng, log), _far_apart_starts, log)


def _long_count(rng, log):
    """1-4 of the count skill's beeps, at least 5 s apart, spread over 5 minutes: how many?"""
    clip = _long_recording(rng, log)
    n = int(rng.integers(1, 5))
    for s in _spaced_starts(rng, n, LONG_SECONDS, 0.25, 5.0, margin_s=1.0):
        _place(clip, tone(BEEP_HZ, 0.25), s)
        _log(log, "beep", s, 0.25, freq=BEEP_HZ)
    return clip, "how many beeps are there?", NUMBER_WORDS[n - 1], NUMBER_WORDS


def _long_background(rng, minutes: int, log: list) -> tuple[np.ndarray, float]:
    """1-5 minutes of faint hiss with a few distractor beeps, so the model must look for the whistle itself."""
    clip_s = minutes * 60.0 - float(rng.uniform(0.0, 20.0)) if minutes > 1 else 60.0
    n = int(clip_s * SAMPLE_RATE)
    clip = 0.02 * rng.uniform(-1.0, 1.0, n)
    _log(log, "hiss", 0.0, n / SAMPLE_RATE, role="background", gain=0.02)
    for s in rng.uniform(1.0, clip_s - 2.0, int(rng.integers(2, 2 + 2 * minutes))):
        _place(clip, tone(BEEP_HZ, 0.2), float(s), 0.5)
        _log(log, "beep", float(s), 0.2, role="distractor", freq=BEEP_HZ, gain=0.5)
    return clip, clip_s


def _long_when(rng, log):
    minutes = int(rng.integers(1, 6))
    clip, clip_s = _long_background(rng, minutes, log)
    minute = int(rng.integers(minutes))
    last_start = min(clip_s, (minute + 1) * 60.0) - 5.0  # 5 s away from minute edges: no ambiguous answers
    at = float(rng.uniform(minute * 60.0 + 5.0, last_start))
    _place(clip, whistle(), at)
    _log(log, "whistle", at, 0.8, contour="rising")
    answers = tuple(f"the {w} minute" for w in ORDINAL_WORDS)
    return clip, "in which minute does the whistle occur?", answers[minute], answers[:minutes]


SKILLS: dict[str, Callable] = {
    "count": _count, "order": _order, "pitch": _pitch, "timbre": _timbre, "loudness": _loudness,
    "duration": _duration, "caption": _caption, "long_order": _long_order, "long_pitch": _long_pitch,
    "long_count": _long_count, "long_when": _long_when,
}
MCQ_SKILLS = ("order", "pitch", "timbre", "long_when")  # asked MMAU-style with probability `mcq_probability`


# ---------------------------------------------------------------------------------------------------------- dataset
def generate(seed: int, split: str, index: int, skills=SHORT_SKILLS,
             mcq_probability: float = MCQ_PROBABILITY) -> dict:
    """Example `index` of `split`: a record with the waveform, prompt, answer, skill and its closed answer set, and
    'events': every sound placed, in time order, as {'kind' (beep | tone | note | noise | whistle | hiss), 'start',
    'duration' (s), 'role' (target: what the question is about | distractor | background), the labels the skill
    defines (pitch high/low, loudness loud/quiet, length long/short, instrument, contour rising) and freq/gain}.
    `mcq_probability` changes only the question's form (the draw is made either way), never the audio."""
    if split not in SPLIT_CODES:
        raise ValueError(f"synthetic split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    skills = tuple(skills)
    unknown = [s for s in skills if s not in SKILLS]
    if unknown or not skills:
        raise ValueError(f"unknown synthetic skills {unknown} (known: {list(SKILLS)})")
    if index < 0:
        raise IndexError(f"synthetic index must be >= 0, got {index}")
    if not 0.0 <= mcq_probability <= 1.0:
        raise ValueError(f"mcq_probability must be in [0, 1], got {mcq_probability}")
    skill = skills[index % len(skills)]  # round robin: every skill equally represented in any window of examples
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    events: list[dict] = []
    clip, prompt, answer, choices = SKILLS[skill](rng, events)
    if skill in MCQ_SKILLS:
        prompt, answer, choices = _mcq(rng, prompt, answer, choices, mcq_probability)
    waveform = _finish(clip)
    return {
        "id": f"synthetic-{split}-{seed}-{index}",
        "waveform": waveform,
        "sample_rate": SAMPLE_RATE,
        "prompt": prompt,
        "answer": answer,
        "skill": skill,
        "choices": list(choices),
        "start": 0.0,
        "duration": waveform.size / SAMPLE_RATE,
        "dataset": "synthetic",
        "events": sorted(events, key=lambda e: e["start"]),  # stable: simultaneous events keep placement order
    }


class SyntheticSource:
    """A random-access source of `num_examples` synthetic records (what `grain.MapDataset.source` takes)."""

    def __init__(self, split: str = "train", num_examples: int = 10000, *, seed: int = 0, skills=SHORT_SKILLS,
                 mcq_probability: float = MCQ_PROBABILITY):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        generate(seed, split, 0, skills, mcq_probability)  # validate the arguments now, not in a worker
        self.split, self.num_examples, self.seed, self.skills = split, int(num_examples), int(seed), tuple(skills)
        self.mcq_probability = float(mcq_probability)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"synthetic index {index} out of range [0, {self.num_examples})")
        return generate(self.seed, self.split, index, self.skills, self.mcq_probability)

    def __repr__(self) -> str:
        return (f"SyntheticSource(split={self.split!r}, n={self.num_examples}, seed={self.seed}, skills={self.skills}, "
                f"mcq_probability={self.mcq_probability})")


def vocabulary_texts() -> list[str]:
    """Every prompt and answer string the generator can produce (MCQ option orders included)."""
    questions = {
        "count": ["how many beeps are there?"],
        "order": ["which came first, the beep or the noise?", "which came first, the noise or the beep?"],
        "pitch": ["is the second tone higher or lower than the first?"],
        "timbre": ["which instrument plays?"],
        "loudness": ["is the beep loud or quiet?"],
        "duration": ["is the tone long or short?"],
        "caption": list(CAPTION_PROMPTS),
        "long_when": ["in which minute does the whistle occur?"],
    }
    answer_sets = [NUMBER_WORDS, ("the beep", "the noise"), ("higher", "lower"), INSTRUMENTS, ("loud", "quiet"),
                   ("long", "short"), CAPTIONS, tuple(f"the {w} minute" for w in ORDINAL_WORDS)]
    texts = [q for qs in questions.values() for q in qs] + [a for s in answer_sets for a in s]
    mcq_sets = [("the beep", "the noise"), ("higher", "lower"), INSTRUMENTS] + [
        tuple(f"the {w} minute" for w in ORDINAL_WORDS[:m]) for m in range(1, 6)]
    for choices in mcq_sets:
        for order in itertools.permutations(choices):
            options = [f"({'abcdefgh'[k]}) {c}" for k, c in enumerate(order)]
            texts.append(MCQ_INTRO + "\n" + "\n".join(options))
            texts.extend(options)
    return texts


@functools.lru_cache(maxsize=None)
def synthetic_tokenizer(vocab_size: int = 512):
    """The tiny BPE tokenizer of the synthetic vocabulary (deterministic; cached per process)."""
    from af2_jax.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(vocabulary_texts(), vocab_size=vocab_size)
