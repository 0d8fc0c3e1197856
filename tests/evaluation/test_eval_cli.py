"""launch/eval.py end to end on a tiny random AF2 saved in our pretrained format: the answers are noise, so this
checks the plumbing, the JSON schema, and that the stored metrics agree with a recomputation from the predictions."""
import collections
import dataclasses
import pathlib
import string

import pytest
from flax import nnx

from af2_jax import pretrained
from af2_jax.data.synthetic import SyntheticSource, synthetic_tokenizer
from af2_jax.evaluation import report, runner
from tests.scripts import load_script

NUM_EXAMPLES = 7  # one per short skill


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from af2_jax.models.af2 import AF2Model, af2_preset

    tok = synthetic_tokenizer()
    config = af2_preset("tiny", max_windows=2)
    config = dataclasses.replace(
        config, llm=dataclasses.replace(config.llm, vocab_size=len(tok)), audio_token_id=tok.audio_id,
        eoc_token_id=tok.eoc_id, pad_token_id=tok.pad_id, sep_token_id=tok.sep_id, eos_token_id=tok.eos_id)
    directory = tmp_path_factory.mktemp("tiny_af2")
    pretrained.save(directory, config, AF2Model(config, rngs=nnx.Rngs(0)), tokenizer=tok)  # as the converter does
    return directory


def _normalise(text):
    """Lowercase, punctuation -> space, drop a/an/the (written independently of af2_jax.evaluation.metrics)."""
    table = str.maketrans({c: " " for c in string.punctuation})
    return [w for w in text.lower().translate(table).split() if w not in ("a", "an", "the")]


def _f1(prediction, reference):
    p, r = _normalise(prediction), _normalise(reference)
    if not p or not r:
        return float(p == r)
    shared = sum((collections.Counter(p) & collections.Counter(r)).values())
    return 0.0 if shared == 0 else 2 * shared / (len(p) + len(r))  # 2PR/(P+R) with P=s/|p|, R=s/|r|


@pytest.mark.slow  # about a minute on 2 cores, nearly all of it compiling generation
def test_eval_cli_writes_consistent_results(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "results.json"
    eval_script = load_script("launch/eval.py")
    eval_script.main(["--checkpoint", str(tiny_model_dir), "--synthetic-split", "test", "--num-examples",
                      str(NUM_EXAMPLES), "--batch-size", "8", "--max-new-tokens", "6", "--output", str(output),
                      "--no-progress"])
    printed = capsys.readouterr().out
    payload = report.read_json(output)

    records = SyntheticSource("test", NUM_EXAMPLES, seed=0)
    predictions = payload["predictions"]
    assert [p["id"] for p in predictions] == [records[i]["id"] for i in range(NUM_EXAMPLES)]
    assert payload["metadata"]["data"] == {"source": "synthetic", "split": "test", "seed": 0,
                                           "skills": list(records.skills), "num_examples": NUM_EXAMPLES,
                                           "mcq_probability": records.mcq_probability}
    assert payload["settings"] == {"batch_size": 8, "max_windows": 2}
    assert payload["metadata"]["sampling"]["max_new_tokens"] == 6
    for p, i in zip(predictions, range(NUM_EXAMPLES)):
        rec = records[i]
        assert (p["task"], p["prompt"], p["answer"]) == (rec["skill"], rec["prompt"], rec["answer"])
        assert not any(t in p["prediction"] for t in ("<SEP>", "<|endoftext|>", "<|endofchunk|>", "<audio>"))
        assert p["exact_match"] == float(_normalise(p["prediction"]) == _normalise(rec["answer"]))
        assert p["token_f1"] == pytest.approx(_f1(p["prediction"], rec["answer"]))
        assert p["chance"] == pytest.approx(1 / len(rec["choices"]))
        assert p["correct"] in (0.0, 1.0)
        if p["correct"]:  # a right answer must at least share a word with the reference, or be its letter
            assert set(_normalise(p["prediction"])) & set(_normalise(rec["answer"]))

    # Summaries are the means of the per-item fields, per task and overall.
    for skill in records.skills:
        items = [p for p in predictions if p["task"] == skill]
        summary = payload["tasks"][skill]
        assert summary["count"] == len(items) == 1
        assert summary["accuracy"] == pytest.approx(sum(p["correct"] for p in items) / len(items))
        assert summary["chance"] == pytest.approx(sum(p["chance"] for p in items) / len(items))
        assert summary["token_f1"] == pytest.approx(sum(p["token_f1"] for p in items) / len(items))
        assert skill in printed
    assert payload["overall"]["accuracy"] == pytest.approx(sum(p["correct"] for p in predictions) / NUM_EXAMPLES)
    assert (payload["tasks"]["caption"]["cider_d"] is not None) and payload["tasks"]["count"]["cider_d"] is None
    assert str(output) in printed


def test_argument_and_model_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    eval_script = load_script("launch/eval.py")
    cases = [(["--checkpoint", str(tmp_path / "nothing"), "--synthetic-split", "test"], "nothing"),
             (["--checkpoint", str(tiny_model_dir), "--synthetic-split", "test", "--batch-size", "0"], "--batch-size"),
             (["--checkpoint", str(tiny_model_dir), "--synthetic-split", "test", "--skills", "count,nope"], "nope"),
             (["--checkpoint", str(tiny_model_dir), "--manifest", str(tmp_path / "none.json")], "none.json"),
             (["--checkpoint", str(tiny_model_dir), "--synthetic-split", "test", "--max-windows", "3"], "exceeds"),
             (["--checkpoint", str(tiny_model_dir), "--synthetic-split", "test", "--output",
               str(tmp_path / "no" / "dir.json")], "does not exist")]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            eval_script.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, argv
        assert expected in err and "Traceback" not in err, (argv, err)


def test_unreadable_records_are_skipped_and_counted(tmp_path):
    records = [{"id": f"r{i}", "prompt": "how many beeps?", "answer": "two", "skill": "count",
                "choices": ["one", "two"], "audio": str(tmp_path / f"missing{i}.wav")} for i in range(2)]
    records.insert(1, dict(SyntheticSource("test", 1, seed=0, skills=("count",))[0], id="good"))
    seen = []

    def generate(windows, prompts):
        seen.append(len(windows))
        return ["two"] * len(windows)
    payload = runner.evaluate(generate, records, runner.EvalSettings(batch_size=2, max_windows=1), progress=False)
    assert [p["id"] for p in payload["predictions"]] == ["good"]
    assert [s["id"] for s in payload["skipped"]] == ["r0", "r1"]
    assert all("missing" in s["error"] for s in payload["skipped"]) and seen == [2]  # one batch, filled up
    with pytest.raises(runner.NothingToEvaluate, match="all 2 records were skipped"):
        runner.evaluate(generate, [records[0], records[2]], runner.EvalSettings(batch_size=2, max_windows=1),
                        progress=False)


def test_default_output_is_written_beside_the_caller_not_into_the_model(tiny_model_dir, tmp_path, monkeypatch):
    eval_script = load_script("launch/eval.py")
    monkeypatch.chdir(tmp_path)
    args = eval_script.build_parser().parse_args(["--checkpoint", str(tiny_model_dir), "--synthetic-split", "test"])
    *_, output = eval_script.prepare(args)
    assert output == pathlib.Path(f"eval_{tiny_model_dir.name}_synthetic_test.json")
