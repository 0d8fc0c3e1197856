"""Synthetic dataset: determinism, split disjointness, and that the answers are true of the audio (checked with an
independent numpy spectral analysis, not with the generator's own parameters)."""
import hashlib

import numpy as np
import pytest

from af2_jax.data import synthetic

RATE = synthetic.SAMPLE_RATE


def _band_energy(wave, lo, hi, frame=400):
    """Per-10 ms... per-frame energy of `wave` between lo and hi Hz (rFFT of non-overlapping frames)."""
    n = wave.size // frame
    spec = np.abs(np.fft.rfft(wave[: n * frame].reshape(n, frame), axis=1)) ** 2
    freqs = np.fft.rfftfreq(frame, 1 / RATE)
    return spec[:, (freqs >= lo) & (freqs <= hi)].sum(1)


def _run_bounds(active):
    """(starts, ends): the index where each run of True in a boolean sequence begins, and one past where it ends."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(active, int), [0]])))
    return edges[::2], edges[1::2]


def _runs(active):
    """Number of runs of True in a boolean sequence."""
    return len(_run_bounds(active)[0])


def test_examples_are_pure_functions_of_seed_split_index():
    source = synthetic.SyntheticSource("train", 50, seed=7, skills=synthetic.ALL_SKILLS[:7])
    late_first = [source[i] for i in (13, 2, 40)]
    again = [synthetic.generate(7, "train", i, synthetic.ALL_SKILLS[:7]) for i in (13, 2, 40)]
    for a, b in zip(late_first, again):
        assert np.array_equal(a["waveform"], b["waveform"])
        assert (a["prompt"], a["answer"], a["skill"], a["choices"]) == (b["prompt"], b["answer"], b["skill"],
                                                                        b["choices"])
    other_seed = synthetic.generate(8, "train", 13, synthetic.ALL_SKILLS[:7])
    assert not np.array_equal(other_seed["waveform"], late_first[0]["waveform"])


def test_mcq_probability_changes_the_question_form_only():
    skills = synthetic.MCQ_SKILLS
    for i in range(8):
        forms = {p: synthetic.generate(5, "train", i, skills, mcq_probability=p) for p in (0.0, 1.0)}
        default = synthetic.generate(5, "train", i, skills)
        assert np.array_equal(forms[0.0]["waveform"], forms[1.0]["waveform"])
        assert np.array_equal(forms[0.0]["waveform"], default["waveform"])
        assert "(a)" not in forms[0.0]["prompt"] and forms[0.0]["answer"] in forms[0.0]["choices"]
        lettered = forms[1.0]
        assert synthetic.MCQ_INTRO in lettered["prompt"] and lettered["answer"].startswith("(")
        assert lettered["answer"][4:] == forms[0.0]["answer"]  # '(x) ' + the open-form answer
        assert default["prompt"] in (forms[0.0]["prompt"], lettered["prompt"])
    with pytest.raises(ValueError, match="mcq_probability"):
        synthetic.SyntheticSource("train", 4, mcq_probability=1.5)


def test_train_and_test_never_share_an_example():
    def digests(split):
        return {hashlib.sha1(synthetic.generate(0, split, i)["waveform"].tobytes()).hexdigest() for i in range(150)}

    train, test = digests("train"), digests("test")
    assert len(train) == 150 and len(test) == 150  # no duplicates within a split either
    assert not train & test
    with pytest.raises(ValueError, match="split"):
        synthetic.generate(0, "validation", 0)


@pytest.mark.parametrize("skill", synthetic.SHORT_SKILLS)
def test_answers_come_from_the_closed_choices(skill):
    for i in range(12):
        record = synthetic.generate(3, "train", i, [skill])
        assert record["skill"] == skill and record["answer"] in record["choices"]
        wave = record["waveform"]
        assert wave.dtype == np.float32 and 0 < np.abs(wave).max() <= 1 and np.isclose(wave.size, record["duration"] * RATE)


def test_count_answers_match_the_number_of_beeps_heard():
    for i in range(16):
        record = synthetic.generate(11, "test", i, ["count"])
        energy = _band_energy(record["waveform"], 900, 1100)
        heard = _runs(energy > 0.1 * energy.max())
        assert synthetic.NUMBER_WORDS[heard - 1] == record["answer"], record["id"]


def test_pitch_answers_match_the_dominant_frequencies():
    for i in range(16):
        record = synthetic.generate(12, "test", i, ["pitch"])
        wave = record["waveform"]
        frame = 1600
        n = wave.size // frame
        frames = wave[: n * frame].reshape(n, frame)
        loud = frames[(frames ** 2).sum(1) > 0.3 * (frames ** 2).sum(1).max()]
        peaks = np.fft.rfftfreq(frame, 1 / RATE)[np.abs(np.fft.rfft(loud, axis=1)).argmax(1)]
        second_higher = peaks[-1] > peaks[0]
        answer = record["answer"].split(") ")[-1]  # multiple-choice answers read "(b) higher"
        assert answer == ("higher" if second_higher else "lower"), record["id"]


def test_long_audio_whistle_minute_matches_where_the_chirp_is():
    for i in range(4):
        record = synthetic.generate(5, "train", i, ["long_when"])
        wave = record["waveform"]
        assert 60 <= wave.size / RATE <= 300
        energy = _band_energy(wave, 2000, 3400, frame=1600)  # above the distractor beeps at 1 kHz
        minute = int(energy.argmax() * 1600 / RATE // 60)
        answer = record["answer"].split(") ")[-1]
        assert answer == f"the {synthetic.ORDINAL_WORDS[minute]} minute", record["id"]


def test_long_order_answer_matches_which_event_starts_first_over_five_minutes():
    answers = set()
    for i in range(6):
        record = synthetic.generate(5, "test", i, ["long_order"])
        wave = record["waveform"]
        assert wave.size == 300 * RATE
        frame = 1600
        tone_band = _band_energy(wave, 900, 1100, frame)  # the 1 kHz beep (the whistles sweep 1.5-3.5 kHz)
        high_band = _band_energy(wave, 5000, 8000, frame)  # only the broadband noise burst reaches here
        (beep,), _ = _run_bounds(tone_band > 0.1 * tone_band.max())
        (noise,), _ = _run_bounds(high_band > 0.1 * high_band.max())
        assert abs(beep - noise) * frame / RATE >= 29  # minutes apart, not seconds
        assert record["answer"] == ("the beep" if beep < noise else "the noise"), record["id"]
        answers.add(record["answer"])
    assert answers == {"the beep", "the noise"}


def test_long_pitch_answer_compares_the_two_steady_tones_minutes_apart():
    frame = 800  # 50 ms: a 0.6 s tone spans ~12 frames, a 0.8 s whistle sweeps 1.5 -> 3.5 kHz across ~16
    for i in range(6):
        wave = (record := synthetic.generate(7, "test", i, ["long_pitch"]))["waveform"]
        n = wave.size // frame
        spectra = np.abs(np.fft.rfft(wave[: n * frame].reshape(n, frame), axis=1))
        peaks = np.fft.rfftfreq(frame, 1 / RATE)[spectra.argmax(1)]
        loud = (spectra ** 2).sum(1) > 0.1 * (spectra ** 2).sum(1).max()
        steady = [(start, np.median(peaks[start + 1:end - 1])) for start, end in zip(*_run_bounds(loud))
                  if np.ptp(peaks[start + 1:end - 1]) < 50]  # a tone keeps its peak; a whistle's moves
        assert len(steady) == 2, record["id"]
        (first_at, first_hz), (second_at, second_hz) = steady
        assert (second_at - first_at) * frame / RATE >= 29
        assert record["answer"] == ("higher" if second_hz > first_hz else "lower"), record["id"]


def test_long_count_answer_matches_the_beeps_heard_over_five_minutes():
    for i in range(8):
        record = synthetic.generate(6, "test", i, ["long_count"])
        assert record["waveform"].size == 300 * RATE
        energy = _band_energy(record["waveform"], 900, 1100)
        heard = _runs(energy > 0.1 * energy.max())
        assert synthetic.NUMBER_WORDS[heard - 1] == record["answer"], record["id"]


def test_mcq_variants_list_options_and_answer_with_a_letter():
    records = [synthetic.generate(0, "train", i, ["order", "pitch", "timbre"]) for i in range(60)]
    mcq = [r for r in records if synthetic.MCQ_INTRO in r["prompt"]]
    assert mcq and len(mcq) < len(records)
    for r in mcq:
        options = r["prompt"].split("\n")[1:]
        assert options == r["choices"] and r["answer"] in options


def test_synthetic_tokenizer_is_cached_and_keeps_answers_short():
    tok = synthetic.synthetic_tokenizer()
    assert synthetic.synthetic_tokenizer() is tok
    for answer in synthetic.NUMBER_WORDS + synthetic.INSTRUMENTS + ("higher", "lower", "loud", "quiet"):
        assert len(tok.encode(answer)) == 1, answer  # one token each: a tiny model's answers are one step
