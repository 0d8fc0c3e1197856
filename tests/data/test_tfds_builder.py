"""TFDS ArrayRecord packing without TensorFlow: audio preserved exactly as int16, text kept, bad rows skipped,
and the shards feed the pipeline."""
import importlib.util

import numpy as np

from af2_jax.data import pipeline, synthetic, tfds_builder
from tests.data.helpers import int16_tone, write_jsonl, write_wav


def test_no_tensorflow_is_needed():
    assert importlib.util.find_spec("tensorflow") is None  # the round trip below runs without it


def test_round_trip_preserves_int16_audio_and_text(tmp_path):
    signals = {f"clip{i}": int16_tone(0.5 + 0.75 * i, freq=300.0 * (i + 1), seed=i) for i in range(3)}
    rows = [{"audio": str(write_wav(tmp_path / f"{name}.wav", x)), "prompt": f"Prompt {name}?",
             "answer": f"answer {name}", "id": name} for name, x in signals.items()]
    rows.append({"audio": str(tmp_path / "missing.wav"), "prompt": "q", "answer": "a", "id": "missing"})
    manifest = write_jsonl(tmp_path / "train.jsonl", rows)
    assert tfds_builder.main(["--manifest", f"train={manifest}", "--out", str(tmp_path / "out")]) == 0
    source = tfds_builder.ArrayRecordSource(tmp_path / "out")
    assert len(source) == 3  # the missing file was skipped, not fatal
    by_id = {source[i]["id"]: source[i] for i in range(len(source))}
    assert sorted(by_id) == sorted(signals)
    for name, x in signals.items():
        record = by_id[name]
        assert record["audio_int16"].dtype == np.int16 and np.array_equal(record["audio_int16"], x)
        assert record["sample_rate"] == 16000
        assert (record["prompt"], record["answer"]) == (f"Prompt {name}?", f"answer {name}")


def test_arrayrecord_source_feeds_the_pipeline(tmp_path):
    records = [synthetic.generate(0, "train", i) for i in range(4)]
    built = tfds_builder.build({"train": records}, tmp_path / "out")
    tok = synthetic.synthetic_tokenizer()
    cfg = {"sources": [{"kind": "arrayrecord", "path": str(built)}]}
    batches = list(pipeline.make_iterator(cfg, tok, seed=0, batch_size=2, max_windows=1, max_tokens=48, epochs=1,
                                          shuffle=False))
    assert len(batches) == 2
    source = tfds_builder.ArrayRecordSource(built)
    first = source[0]
    original = next(r for r in records if r["id"] == first["id"])
    # The stored wave is the prepared one: peak 1 after the reference's normalisation, zero padding after it.
    n = original["waveform"].size
    wave = batches[0]["audio"][0, 0]
    assert np.abs(wave[:n]).max() == 1.0 and not wave[n:].any()
    assert np.array_equal(wave[:n], (first["audio_int16"] / 32767.0).astype(np.float32))


def test_rebuilding_into_the_same_out_with_other_manifests_is_refused(tmp_path, capsys):
    clip = str(write_wav(tmp_path / "a.wav", int16_tone(0.5, seed=0)))
    first = write_jsonl(tmp_path / "first.jsonl", [{"audio": clip, "prompt": "p", "answer": "one", "id": "a"}])
    second = write_jsonl(tmp_path / "second.jsonl", [{"audio": clip, "prompt": "p", "answer": "two", "id": "b"},
                                                     {"audio": clip, "prompt": "q", "answer": "three", "id": "c"}])
    out = str(tmp_path / "out")
    assert tfds_builder.main(["--manifest", f"train={first}", "--out", out]) == 0
    assert tfds_builder.main(["--manifest", f"train={first}", "--out", out]) == 0  # the same inputs: reused
    assert tfds_builder.main(["--manifest", f"train={second}", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "first.jsonl" in err and "--overwrite" in err
    assert [tfds_builder.ArrayRecordSource(out)[i]["id"] for i in range(1)] == ["a"]  # the old data untouched
    assert tfds_builder.main(["--manifest", f"train={second}", "--out", out, "--overwrite"]) == 0
    source = tfds_builder.ArrayRecordSource(out)
    assert sorted(source[i]["answer"] for i in range(len(source))) == ["three", "two"]
