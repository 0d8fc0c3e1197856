"""Several audios per record: AF1's few-shot (ICL) and chat texts with AF2's tokens, their loss masks, interleaved
manifests (JSONL lists and AF1's interleaved_knn files), and the batch layout through the Grain pipeline.

References are independent of the code under test: texts written out literally, loss masks built by encoding each
segment on its own (special tokens split the text, so segments tokenise alone exactly as inside the whole), audio
read with af2_jax.audio.io and cut with make_windows."""
import json

import numpy as np
import pytest

from af2_jax import tokenizer as af2_tok
from af2_jax.audio.io import load_audio
from af2_jax.audio.windows import WINDOW_SAMPLES, make_windows, pad_batch
from af2_jax.data import examples, manifests, pipeline
from af2_jax.data.synthetic_icl import icl_tokenizer
from tests.data.helpers import int16_tone, write_jsonl, write_wav

MAX_TOKENS = 80


@pytest.fixture(scope="module")
def tok():
    return icl_tokenizer()


def _segments(tok, parts):
    """(ids, mask) from (text, is_target) parts, each encoded on its own."""
    ids, mask = [], []
    for text, target in parts:
        piece = tok.encode(text)
        ids += piece
        mask += [int(target)] * len(piece)
    return ids, mask


def test_icl_text_and_every_answer_is_a_target(tok):
    shots = [("What is this sound called?", "Bari"), ("what is this sound called? ", "dosa")]
    text = af2_tok.format_icl_example(shots, "What is THIS sound called?", "Bari")
    assert text == ("here are similar examples. <audio>what is this sound called?<SEP>bari<|endofchunk|>"
                    "<audio>what is this sound called?<SEP>dosa<|endofchunk|>"
                    "<audio>what is this sound called?<SEP>bari<|endofchunk|><|endoftext|>")
    assert af2_tok.format_icl_prompt(shots, "q", kind="random", task="Naming").startswith(
        "here are random examples. the task is naming. <audio>")
    ids, mask, kept = af2_tok.encode_icl_example(tok, shots, "what is this sound called?", "bari")
    want_ids, want_mask = _segments(tok, [
        ("here are similar examples. ", 0), ("<audio>", 0), ("what is this sound called?", 0), ("<SEP>", 0),
        ("bari", 1), ("<|endofchunk|>", 1),
        ("<audio>", 0), ("what is this sound called?", 0), ("<SEP>", 0), ("dosa", 1), ("<|endofchunk|>", 1),
        ("<audio>", 0), ("what is this sound called?", 0), ("<SEP>", 0), ("bari", 1), ("<|endofchunk|>", 1),
        ("<|endoftext|>", 1)])
    assert (ids, mask, kept) == (want_ids, want_mask, 2)
    assert ids.count(tok.audio_id) == 3 and sum(mask) == 7


def test_icl_over_the_limit_drops_the_first_examples(tok):
    shots = [("what is this sound called?", n) for n in ("bari", "dosa", "kimo", "gutu")]
    full, _, _ = af2_tok.encode_icl_example(tok, shots, "what is this sound called?", "bari")
    two = tok.encode(af2_tok.format_icl_example(shots[2:], "what is this sound called?", "bari"))
    ids, mask, kept = af2_tok.encode_icl_example(tok, shots, "what is this sound called?", "bari",
                                                 max_len=len(two))
    assert len(full) > len(two) and kept == 2 and ids == two and ids.count(tok.audio_id) == 3
    assert mask[-1] == 1 and ids[-1] == tok.eos_id  # the query's answer is never cut
    with pytest.raises(af2_tok.PromptTooLongError):
        af2_tok.encode_icl_example(tok, shots, "what is this sound called?", "bari", max_len=5)


def test_chat_text_every_assistant_answer_and_eos_is_a_target(tok):
    dialogue = [("How many beeps are there?", "Two"), ("and one more than that?", "three")]
    text = af2_tok.format_chat(dialogue)
    assert text == ("the task is dialog. <audio>user: how many beeps are there? \nassistant: <SEP>two<|endofchunk|>"
                    "<|endoftext|>\nuser: and one more than that? \nassistant: <SEP>three<|endofchunk|>"
                    "<|endoftext|>\n")
    ids, mask = af2_tok.encode_chat(tok, dialogue)
    want = _segments(tok, [
        ("the task is dialog. ", 0), ("<audio>", 0), ("user: how many beeps are there? \nassistant: ", 0),
        ("<SEP>", 0), ("two", 1), ("<|endofchunk|>", 1), ("<|endoftext|>", 1),
        ("\nuser: and one more than that? \nassistant: ", 0), ("<SEP>", 0), ("three", 1), ("<|endofchunk|>", 1),
        ("<|endoftext|>", 1), ("\n", 0)])
    assert (ids, mask) == want
    # a clip attached at round 1 puts its <audio> before that round's user turn
    prompt = af2_tok.format_chat_prompt(dialogue[:1], "and now?", audio_turns=[0, 1])
    assert prompt.endswith("<|endoftext|>\n<audio>user: and now? \nassistant: <SEP>")
    assert prompt.count("<audio>") == 2
    with pytest.raises(ValueError, match="round 3"):
        af2_tok.format_chat(dialogue, audio_turns=[3])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    paths = {}
    for name, seconds, freq in (("a", 2.0, 440.0), ("b", 3.5, 660.0), ("c", 1.2, 880.0), ("long", 14.0, 300.0)):
        paths[name] = str(write_wav(root / f"{name}.wav", int16_tone(seconds, freq)))
    return root, paths


def test_interleaved_jsonl_rows_and_errors(tmp_path, clips):
    _, paths = clips
    rows = [{"audio": [paths["a"], paths["b"], paths["c"]], "prompt": ["p1", "p2", "q"], "answer": ["x", "y", "z"],
             "start": [0, 0.5, None], "interleaved": "random", "id": "e0"},
            {"audio": [paths["a"]], "prompt": ["only"], "answer": ["target"]},
            {"name": "a.wav", "dialogue": [{"user": "how many?", "assistant": "two"}, ["more?", "three"]]}]
    path = write_jsonl(tmp_path / "icl.jsonl", rows)
    first, single, chat = manifests.read_jsonl(path)
    assert first["audio"] == [paths["a"], paths["b"], paths["c"]] and first["interleaved"] == "random"
    assert first["prompt"] == ["p1", "p2", "q"] and first["start"] == [0.0, 0.5, 0.0]
    assert first["duration"] == [None] * 3
    assert single["audio"] == paths["a"] and single["prompt"] == "only"  # one clip: the plain record
    assert chat["dialogue"] == [["how many?", "two"], ["more?", "three"]] and chat["audio_turns"] == [0]
    assert chat["audio"] == str(tmp_path / "a.wav")
    # written back and read again: the same records
    manifests.write_jsonl([first, single, chat], tmp_path / "again.jsonl")
    again = manifests.read_jsonl(tmp_path / "again.jsonl", dataset="icl")
    assert again == [first, single, chat]
    bad = [({"audio": ["x", "y"], "prompt": ["p"], "answer": ["a", "b"]}, "list of 2 strings"),
           ({"audio": ["x", "y"], "prompt": ["p", "q"], "answer": ["a", " "]}, "empty"),
           ({"audio": ["x", "y"], "prompt": ["p", "q"], "answer": ["a", "b"], "start": 3}, "one per audio"),
           ({"audio": ["x", "y"], "prompt": ["p", "q"], "answer": ["a", "b"], "interleaved": "knn"}, "interleaved"),
           ({"audio": "x", "dialogue": []}, "non-empty list"),
           ({"audio": "x", "dialogue": [{"user": "q"}]}, "round 0"),
           ({"audio": ["x", "y"], "dialogue": [["q", "a"]], "audio_turns": [0, 2]}, "audio_turns")]
    for row, message in bad:
        with pytest.raises(manifests.ManifestError, match=message):
            manifests.read_jsonl(write_jsonl(tmp_path / "bad.jsonl", [row]))


def test_af1_interleaved_knn_file_resolves_train_examples_and_split_target(tmp_path):
    task = tmp_path / "Clotho-AQA"
    task.mkdir()

    def split_file(name, rows):
        content = {"dataset_path": str(tmp_path / "audio"), "split": name, "split_path": name,
                   "flamingo_task": "Clotho-AQA", "total_num": len(rows),
                   "data": {str(k): row for k, row in enumerate(rows)}}
        (task / f"{name}.json").write_text(json.dumps(content))

    split_file("train", [{"name": f"t{k}.wav", "prompt": f"tp{k}", "output": f"ta{k}"} for k in range(4)])
    split_file("test", [{"name": f"s{k}.wav", "prompt": f"sp{k}", "output": f"sa{k}", "audio_start": 1.5}
                        for k in range(2)])
    knn = {"dataset_path": str(tmp_path / "audio"), "split": "test", "split_path": "test",
           "flamingo_task": "Clotho-AQA", "total_num": 2,
           "interleaved_data": {"0": {"generation_index_in_split": 1, "fewshot_indices_in_train": [3, 0]},
                                "1": {"generation_index_in_split": 0, "fewshot_indices_in_train": [2]}}}
    (task / "interleaved_knn-test.json").write_text(json.dumps(knn))
    records = manifests.read_manifest(task / "interleaved_knn-test.json")
    audio = tmp_path / "audio"
    assert records[0]["audio"] == [str(audio / "train/t3.wav"), str(audio / "train/t0.wav"),
                                   str(audio / "test/s1.wav")]
    assert records[0]["prompt"] == ["tp3", "tp0", "sp1"] and records[0]["answer"] == ["ta3", "ta0", "sa1"]
    assert records[0]["start"] == [0.0, 0.0, 1.5] and records[0]["interleaved"] == "similar"
    assert records[1]["audio"][-1] == str(audio / "test/s0.wav") and len(records[1]["audio"]) == 2
    (task / "interleaved_random-test.json").write_text(json.dumps(dict(knn, interleaved_data={
        "0": {"generation_index_in_split": 7, "fewshot_indices_in_train": [0]}})))
    with pytest.raises(manifests.ManifestError, match="index 7 is not an entry"):
        manifests.read_manifest(task / "interleaved_random-test.json")
    assert manifests.read_manifest(task / "interleaved_random-test.json", strict=False) == []


def _windows(path, start=0.0, max_windows=2):
    return make_windows(load_audio(path, start=start, duration=max_windows * 10.0), max_windows)


def test_pipeline_batches_interleaved_and_single_records(tmp_path, clips, tok):
    _, paths = clips
    icl_rows = [{"id": f"icl{k}", "audio": [paths["a"], paths["long"], paths["b"]], "prompt": ["p", "p", "q"],
                 "answer": ["bari", "dosa", "bari"], "start": [0.0, 0.0, 0.25]} for k in range(2)]
    plain_rows = [{"id": f"one{k}", "audio": paths[n], "prompt": "what is this sound called?", "answer": "kimo"}
                  for k, n in enumerate(("a", "long"))]
    path = write_jsonl(tmp_path / "mixed.jsonl", icl_rows + plain_rows)
    cfg = {"sources": [{"kind": "jsonl", "path": str(path)}]}
    it = pipeline.make_iterator(cfg, tok, seed=0, batch_size=2, max_windows=2, max_tokens=MAX_TOKENS,
                                shuffle=False, epochs=1, drop_remainder=False)
    batches = list(it)
    assert len(batches) == 2
    multi = next(b for b in batches if b["audio"].ndim == 4)
    single = next(b for b in batches if b["audio"].ndim == 3)
    # several audios: (B, A, W, 160000), each clip in its slot with its own window count
    assert multi["audio"].shape == (2, 3, 2, WINDOW_SAMPLES) and multi["audio_mask"].shape == (2, 3, 2)
    expected = [_windows(paths["a"]), _windows(paths["long"]), _windows(paths["b"], start=0.25)]
    for slot, windows in enumerate(expected):
        n = len(windows)
        assert np.array_equal(multi["audio"][0, slot, :n], windows)
        assert np.all(multi["audio"][0, slot, n:] == 0)
        assert multi["audio_mask"][0, slot].tolist() == [1.0] * n + [0.0] * (2 - n)
    ids, mask, _ = af2_tok.encode_icl_example(tok, [("p", "bari"), ("p", "dosa")], "q", "bari")
    assert multi["input_ids"][0, :len(ids)].tolist() == ids and multi["loss_mask"][0, :len(ids)].tolist() == mask
    assert np.all(multi["input_ids"][0, len(ids):] == tok.pad_id) and multi["attention_mask"][0].sum() == len(ids)
    # single-audio records: exactly today's layout and values
    audio, audio_mask = pad_batch([_windows(paths["a"]), _windows(paths["long"])])
    assert np.array_equal(single["audio"], audio) and np.array_equal(single["audio_mask"], audio_mask)
    ids, mask = af2_tok.encode_example(tok, "what is this sound called?", "kimo")
    assert single["input_ids"][0, :len(ids)].tolist() == ids and single["loss_mask"][0, :len(ids)].tolist() == mask
    assert it.padding_fraction == pytest.approx(1 - (2 * (1 + 2 + 1) + 1 + 2) / (2 * 6 + 2 * 2))


def test_chat_records_become_examples(tmp_path, clips, tok):
    _, paths = clips
    dialogue = [["how many beeps are there?", "two"], ["and one more than that?", "three"]]
    one = examples.make_example({"id": "c", "audio": paths["a"], "dialogue": dialogue}, tok, max_windows=1,
                                max_tokens=MAX_TOKENS)
    ids, mask = af2_tok.encode_chat(tok, [tuple(r) for r in dialogue])
    assert one["input_ids"].tolist() == ids and one["loss_mask"].tolist() == mask
    assert np.array_equal(one["windows"], _windows(paths["a"], max_windows=1)) and "audios" not in one
    two = examples.make_example({"id": "c2", "audio": [paths["a"], paths["c"]], "dialogue": dialogue,
                                 "audio_turns": [0, 1]}, tok, max_windows=1, max_tokens=MAX_TOKENS)
    text = ("the task is dialog. <audio>user: how many beeps are there? \nassistant: <SEP>two<|endofchunk|>"
            "<|endoftext|>\n<audio>user: and one more than that? \nassistant: <SEP>three<|endofchunk|>"
            "<|endoftext|>\n")
    assert two["input_ids"].tolist() == tok.encode(text) and len(two["audios"]) == 2
    assert np.array_equal(two["audios"][1], _windows(paths["c"], max_windows=1))
    # truncation cutting round 1's <audio>: the record is refused, naming the problem
    short = examples.make_example_or_skip({"id": "cut", "audio": [paths["a"], paths["c"]], "dialogue": dialogue,
                                           "audio_turns": [0, 1]}, tok, max_windows=1, max_tokens=20)
    assert isinstance(short, examples.Skipped) and "2 clips" in short.reason
