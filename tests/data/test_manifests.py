"""Manifest parsing: the reference's dataset JSON and JSONL, field aliases, path resolution, clear errors."""
import json

import pytest

from af2_jax.data import manifests
from tests.data.helpers import write_jsonl


def test_af2_json_paths_fields_and_order(tmp_path):
    content = {
        "split": "train", "split_path": "audio/train", "flamingo_task": "Clotho-AQA-AQA", "total_num": 3,
        "data": {
            "10": {"name": "c.flac", "prompt": "Q3", "output": "A3"},
            "2": {"name": "b.wav", "question": "Q2", "answer": "A2", "audio_start": 4.5, "duration": 10.0},
            "0": {"name": "/abs/a.wav", "prompt": "Q1", "output": "A1", "duration": "30"},
        },
    }
    path = tmp_path / "Clotho-AQA-AQA" / "train.json"
    path.parent.mkdir()
    path.write_text(json.dumps(content))
    records = manifests.read_af2_manifest(path)
    assert [r["prompt"] for r in records] == ["Q1", "Q2", "Q3"]  # numeric key order, not string order
    assert records[0]["audio"] == "/abs/a.wav" and records[0]["duration"] == 30.0 and records[0]["start"] == 0.0
    assert records[1]["audio"] == str(path.parent / "audio/train/b.wav")
    assert (records[1]["start"], records[1]["duration"], records[1]["answer"]) == (4.5, 10.0, "A2")
    assert records[2]["duration"] is None and records[2]["id"] == "Clotho-AQA-AQA-10"
    assert all(r["dataset"] == "Clotho-AQA-AQA" for r in records)
    # An explicit audio root (the reference's DATA_ROOT) wins over the manifest's folder.
    rooted = manifests.read_af2_manifest(path, audio_root=tmp_path / "root")
    assert rooted[1]["audio"] == str(tmp_path / "root" / "audio/train/b.wav")


def test_jsonl_rows_and_aliases(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [
        {"audio": "x.wav", "prompt": "p", "answer": "a", "start": 1, "duration": 2, "id": "first"},
        {"audio_path": "sub/y.wav", "instruction": "p2", "response": "a2", "skill": "count", "choices": ["a2"]},
    ])
    with open(path, "a") as f:
        f.write("\n")  # a trailing blank line is fine
    records = manifests.read_manifest(path)
    assert [r["id"] for r in records] == ["first", "set-2"]
    assert records[0]["audio"] == str(tmp_path / "x.wav") and (records[0]["start"], records[0]["duration"]) == (1, 2)
    assert records[1]["audio"] == str(tmp_path / "sub/y.wav") and records[1]["skill"] == "count"


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "answer": "a"}, "no audio path"),
    ({"audio": "x.wav", "answer": "a"}, "no prompt"),
    ({"audio": "x.wav", "prompt": "p"}, "no answer"),
    ({"audio": "x.wav", "prompt": "p", "answer": "  "}, "'answer' is empty"),
    ({"audio": "x.wav", "prompt": "p", "answer": "a", "duration": "long"}, "'duration' must be a number"),
    ({"audio": "x.wav", "prompt": "p", "answer": "a", "start": -1}, "'start' must be a finite non-negative"),
    ({"audio": ["x.wav", "y.wav"], "prompt": "p", "answer": "a"}, "interleaved"),
    ({"audio": "x.wav", "prompt": 3, "answer": "a"}, "'prompt' must be a string"),
])
def test_bad_rows_name_the_file_line_and_problem(tmp_path, row, message):
    good = {"audio": "ok.wav", "prompt": "p", "answer": "a"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(manifests.ManifestError, match=message) as info:
        manifests.read_jsonl(path)
    assert f"{path}: line 2" in str(info.value)
    # Lenient mode (training): the bad row is skipped, the good one kept.
    assert [r["audio"] for r in manifests.read_jsonl(path, strict=False)] == [str(tmp_path / "ok.wav")]


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(manifests.ManifestError, match="not found"):
        manifests.read_manifest(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": {"0": ')
    with pytest.raises(manifests.ManifestError, match=f"{broken}: invalid JSON"):
        manifests.read_manifest(broken)
    other = tmp_path / "other.json"
    other.write_text('{"rows": []}')
    with pytest.raises(manifests.ManifestError, match="not an AF2 manifest"):
        manifests.read_manifest(other)
    entry = tmp_path / "entry.json"
    entry.write_text(json.dumps({"data": {"0": {"name": "a.wav", "prompt": "p"}}}))
    with pytest.raises(manifests.ManifestError, match=f"{entry}: entry 0: no answer"):
        manifests.read_manifest(entry)
    lines = write_jsonl(tmp_path / "lines.jsonl", [{"audio": "a", "prompt": "p", "answer": "a"}])
    with open(lines, "a") as f:
        f.write("{not json}\n")
    with pytest.raises(manifests.ManifestError, match="line 2: invalid JSON"):
        manifests.read_jsonl(lines)
