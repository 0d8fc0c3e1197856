"""Reading inference items: JSONL, JSON lists and AF2 manifests; errors name the file and the entry."""
import json

import pytest

from af2_jax.inference.requests import RequestError, read_items


def test_formats_and_relative_paths(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps({"audio": "a.wav", "prompt": "what?"}) + "\n\n"
                                      + json.dumps({"id": "x", "path": "/abs/b.wav", "question": "who?"}) + "\n")
    items = read_items(tmp_path / "q.jsonl")
    assert [(i.id, i.audio, i.prompt) for i in items] == [("1", str(tmp_path / "a.wav"), "what?"),
                                                          ("x", "/abs/b.wav", "who?")]
    (tmp_path / "q.json").write_text(json.dumps([{"name": "c.flac", "prompt": "p"}]))
    assert read_items(tmp_path / "q.json")[0].audio == str(tmp_path / "c.flac")
    af2 = {"dataset_path": str(tmp_path / "root"), "split_path": "test",
           "data": {"0": {"name": "d.wav", "prompt": "q0", "output": "ignored"}}}
    (tmp_path / "af2.json").write_text(json.dumps(af2))
    assert read_items(tmp_path / "af2.json")[0].audio == str(tmp_path / "root" / "test" / "d.wav")


def test_errors_name_where(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"audio": "a.wav"}) + "\n")
    with pytest.raises(RequestError, match=r"bad.jsonl: line 1: needs an audio path"):
        read_items(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(RequestError, match="line 1: invalid JSON"):
        read_items(tmp_path / "broken.jsonl")
    with pytest.raises(RequestError, match="not found"):
        read_items(tmp_path / "missing.jsonl")
