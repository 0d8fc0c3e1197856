"""The evaluation loop with a stand-in generator whose right and wrong answers are known by construction."""
import numpy as np
import pytest

from af2_jax.audio.windows import WINDOW_SAMPLES
from af2_jax.data.synthetic import SyntheticSource
from af2_jax.evaluation import runner


class ScriptedGenerator:
    """Answers record i (in test-set order) right if i % 3 == 0, with another choice if 1, with noise if 2.

    It checks that it is called with the records' prompts in order and one (n, 160000) window stack per prompt."""

    def __init__(self, records, batch_size):
        self.records, self.batch_size, self.cursor = records, batch_size, 0

    def __call__(self, windows, prompts):
        assert len(windows) == len(prompts) == self.batch_size
        real = min(self.batch_size, len(self.records) - self.cursor)
        answers = []
        for offset in range(self.batch_size):
            index = self.cursor + min(offset, real - 1)  # the tail batch repeats its last record
            record = self.records[index]
            assert prompts[offset] == record["prompt"]
            assert windows[offset].ndim == 2 and windows[offset].shape[1] == WINDOW_SAMPLES
            wrong = next(c for c in record["choices"] if c != record["answer"])
            # Wrapped as the model writes it: the runner must strip everything but the answer.
            answer = (record["answer"], wrong, "zzz qqq")[index % 3]
            answers.append(f"<audio>{record['prompt']}<SEP>{answer.upper()}<|endofchunk|><|endoftext|>")
        self.cursor += real
        return answers


@pytest.mark.parametrize("batch_size", [4, 5])
def test_evaluate_scores_each_record_against_its_own_answer(batch_size):
    records = SyntheticSource("test", 14, seed=0)  # 14 = 2 of each of the 7 short skills; not a batch multiple
    settings = runner.EvalSettings(batch_size=batch_size, max_windows=1)
    payload = runner.evaluate(ScriptedGenerator(records, batch_size), records, settings, progress=False,
                              metadata={"run": "scripted"})
    predictions = payload["predictions"]
    assert [p["id"] for p in predictions] == [records[i]["id"] for i in range(14)]
    assert [p["correct"] for p in predictions] == [1.0 if i % 3 == 0 else 0.0 for i in range(14)]
    assert [p["prediction"] for p in predictions][:3] == [
        records[0]["answer"].upper(), next(c for c in records[1]["choices"] if c != records[1]["answer"]).upper(),
        "ZZZ QQQ"]
    # Per task: the skills repeat every 7 records, so task k holds records k and k + 7.
    skills = [records[i]["skill"] for i in range(7)]
    for k, skill in enumerate(skills):
        expected = np.mean([float(i % 3 == 0) for i in (k, k + 7)])
        assert payload["tasks"][skill]["accuracy"] == pytest.approx(expected)
        assert payload["tasks"][skill]["chance"] == pytest.approx(
            np.mean([1 / len(records[i]["choices"]) for i in (k, k + 7)]))
        assert payload["tasks"][skill]["no_option_rate"] == pytest.approx(np.mean([float(i % 3 == 2) for i in (k, k + 7)]))
    assert payload["overall"]["accuracy"] == pytest.approx(5 / 14)  # i in {0, 3, 6, 9, 12}
    assert payload["tasks"]["caption"]["cider_d"] is not None
    assert payload["metadata"] == {"run": "scripted"} and payload["settings"] == {"batch_size": batch_size,
                                                                                   "max_windows": 1}


def test_windows_follow_the_clip_length():
    records = [SyntheticSource("test", 1, seed=0, skills=("long_when",))[0]]
    windows = runner.record_windows(records[0], max_windows=3)
    expected = min(3, -(-records[0]["waveform"].size // WINDOW_SAMPLES))
    assert windows.shape == (expected, WINDOW_SAMPLES)


def test_empty_test_set_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        runner.evaluate(lambda w, p: [], [], runner.EvalSettings(), progress=False)


def test_concatenated_reads_parts_in_order():
    joined = runner.Concatenated([["a", "b"], [], ["c"]])
    assert len(joined) == 3 and [joined[i] for i in range(3)] == ["a", "b", "c"]
    with pytest.raises(IndexError):
        joined[3]
