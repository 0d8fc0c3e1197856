"""launch/eval.py end to end on a tiny random AF2 saved in our pretrained format: the answers are noise, so this
checks the plumbing, the JSON schema, and that the stored metrics agree with a recomputation from the predictions."""
import collections
import dataclasses
import importlib.util
import json
import pathlib
import string

import pytest
from flax import nnx

from af2_jax import pretrained
from af2_jax.data.synthetic import SyntheticSource, synthetic_tokenizer
from af2_jax.evaluation import report, runner

REPO = pathlib.Path(__file__).resolve().parents[2]
NUM_EXAMPLES = 7  # one per short skill


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from af2_jax.models.af2 import AF2Model, af2_preset

    tok = synthetic_tokenizer()
    config = af2_preset("tiny", max_windows=2)
    config = dataclasses.replace(
        config, llm=dataclasses.replace(config.llm, vocab_size=len(tok)), audio_token_id=tok.audio_id,
        eoc_token_id=tok.eoc_id, pad_token_id=tok.pad_id, sep_token_id=tok.sep_id, eos_token_id=tok.eos_id)
    directory = tmp_path_factory.mktemp("tiny_af2")
    pretrained.save(directory, config, AF2Model(config, rngs=nnx.Rngs(0)))
    tok.save(directory)  # found beside the model, as a converted release would ship it
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
    eval_script = _load_script("eval")
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


def test_model_directory_accepts_a_workdir_with_final(tmp_path):
    (tmp_path / "final" / "params").mkdir(parents=True)
    (tmp_path / "final" / "config.json").write_text(json.dumps({"model": "af2", "config": {}}))
    assert runner.model_directory(tmp_path) == tmp_path / "final"
    assert runner.model_directory(tmp_path / "final") == tmp_path / "final"
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        runner.model_directory(tmp_path / "elsewhere")
