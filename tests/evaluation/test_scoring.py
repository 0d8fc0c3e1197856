"""Per-item scoring of synthetic and MMAU-style examples, and per-task summaries recomputed by hand."""
import pytest

from af2_jax.data import synthetic
from af2_jax.evaluation import report, scoring


def _example(record):
    return {"id": record["id"], "task": record["skill"], "prompt": record["prompt"], "answer": record["answer"],
            "choices": record["choices"]}


def test_synthetic_answers_score_correct_and_other_choices_wrong():
    records = [synthetic.generate(0, "test", i) for i in range(28)]  # 4 of each of the 7 short skills
    kinds = set()
    for rec in records:
        ex = _example(rec)
        right = scoring.score_item(ex, rec["answer"])
        assert right["correct"] == 1.0 and right["exact_match"] == 1.0 and right["token_f1"] == 1.0
        kinds.add(right["kind"])
        assert right["chance"] == pytest.approx(1 / len(rec["choices"]))
        wrong_choice = next(c for c in rec["choices"] if c != rec["answer"])
        assert scoring.score_item(ex, wrong_choice)["correct"] == 0.0
        if right["kind"] == scoring.MCQ:  # "(b) the noise": the bare letter also answers it
            assert scoring.score_item(ex, rec["answer"][:3])["correct"] == 1.0
        else:  # a closed set asked without letters: a lone "a" is a word, not option (a)
            assert scoring.score_item(ex, "a")["chosen"] is None
    assert kinds == {scoring.MCQ, scoring.CLOSED}


def test_summaries_match_a_hand_count():
    mcq_prompt = "which came first? choose the correct option from the following options:\n(a) the beep\n(b) the noise"
    examples = [
        ({"id": "1", "task": "order", "prompt": mcq_prompt, "answer": "(b) the noise"}, "b"),  # right
        ({"id": "2", "task": "order", "prompt": mcq_prompt, "answer": "(a) the beep"}, "the noise"),  # wrong
        ({"id": "3", "task": "order", "prompt": mcq_prompt, "answer": "(a) the beep"}, "xyz"),  # no option
        ({"id": "4", "task": "count", "prompt": "how many?", "answer": "two", "choices": ["one", "two", "three"]},
         "two"),  # right
        ({"id": "5", "task": "open_qa", "prompt": "what is it?", "answer": "a dog barking"}, "dog barking loudly"),
    ]
    items = [scoring.score_item(ex, pred) for ex, pred in examples]
    tasks, overall = scoring.summarize_by_task(items)
    assert list(tasks) == ["count", "open_qa", "order"]
    assert tasks["order"]["accuracy"] == pytest.approx(1 / 3)
    assert tasks["order"]["chance"] == pytest.approx(1 / 2)
    assert tasks["order"]["no_option_rate"] == pytest.approx(1 / 3)
    assert tasks["count"]["accuracy"] == 1.0 and tasks["count"]["chance"] == pytest.approx(1 / 3)
    assert tasks["open_qa"]["accuracy"] is None and tasks["open_qa"]["chance"] is None
    # "dog barking loudly" vs "dog barking" (article dropped): P = 2/3, R = 1 -> F1 = 0.8.
    assert tasks["open_qa"]["token_f1"] == pytest.approx(0.8)
    assert overall["count"] == 5 and overall["closed_count"] == 4
    assert overall["accuracy"] == pytest.approx(2 / 4)  # items 1 and 4 of the four closed ones
    assert overall["chance"] == pytest.approx((1 / 2 * 3 + 1 / 3) / 4)
    assert overall["macro_accuracy"] == pytest.approx((1 / 3 + 1) / 2)
    assert all(s["cider_d"] is None for s in tasks.values())
    table = report.format_table(tasks, overall)
    assert "order" in table and "33.3" in table and "50.0" in table


def test_captioning_tasks_get_cider_d():
    examples = [{"id": str(i), "task": "caption", "prompt": "describe the audio.", "answer": a}
                for i, a in enumerate(["one high beep", "two low beeps, then noise"])]
    items = [scoring.score_item(ex, ex["answer"]) for ex in examples]
    tasks, _ = scoring.summarize_by_task(items)
    assert tasks["caption"]["cider_d"] is not None and tasks["caption"]["cider_d"] > 0


def test_json_round_trip_and_schema_check(tmp_path):
    path = report.write_json(tmp_path / "sub" / "r.json", {"tasks": {}, "predictions": []})
    assert report.read_json(path)["schema"] == report.SCHEMA
    path.write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="schema"):
        report.read_json(path)


def test_a_reference_outside_its_options_is_scored_as_open_text_with_a_note():
    example = {"id": "x", "task": "mmau", "prompt": "what is it?\n(A) dog\n(B) cat", "answer": "a bird"}
    item = scoring.score_item(example, "bird")
    assert item["kind"] == scoring.OPEN and item["correct"] is None and "none of the options" in item["note"]
    assert item["exact_match"] == 1.0  # "a bird" vs "bird": articles do not count
    closed = {"id": "y", "task": "count", "prompt": "how many?", "answer": "five", "choices": ["one", "two"]}
    assert scoring.score_item(closed, "five")["kind"] == scoring.OPEN
