"""The AF-CLAP data pipeline: batch layout and dtypes, caption manifests (JSONL/JSON/LAION folder, CompA form, errors
naming the line), missing audio skipped and counted, padding of short caption lists, exact resume, process
coverage, the numpy front end against af2_jax.audio.clap_features, and clips over 10 s flagged longer."""
import json

import numpy as np
import pytest

from af2_jax.audio import clap_features
from af2_jax.data import bucketing, caption_manifests, clap_pipeline
from af2_jax.data import captions as C
from af2_jax.data.manifests import ManifestError
from tests.data.helpers import int16_tone, write_jsonl, write_wav

M, N = 3, 4


@pytest.fixture(scope="module")
def tok():
    return C.synthetic_caption_tokenizer()


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _synthetic(n=24, **extra):
    return {"sources": [{"kind": "synthetic_captions", "num_examples": n, "seed": 2, **extra}]}


def test_batch_layout_dtypes_and_positives_first(tok):
    it = clap_pipeline.make_clap_iterator(_synthetic(), tok, seed=0, batch_size=4, num_positives=M,
                                          num_negatives=N)
    batch = next(it)
    assert tuple(sorted(batch)) == tuple(sorted(clap_pipeline.CLAP_BATCH_KEYS))
    assert batch["mel_fusion"].shape == (4, 4, 1001, 64) and batch["mel_fusion"].dtype == np.float32
    assert batch["longer"].shape == (4,) and batch["longer"].dtype == bool and not batch["longer"].any()
    for key in ("text_ids", "text_mask"):
        assert batch[key].shape == (4, M + N, 77) and batch[key].dtype == np.int32
    assert batch["negative_valid"].shape == (4, N) and batch["negative_valid"].dtype == np.float32
    assert np.all(batch["negative_valid"] == 1)  # the synthetic source makes N negatives
    # Rows are the process's records in order (none skipped): positives first, then negatives, each tokenised.
    records = clap_pipeline.make_clap_record_dataset(_synthetic(), seed=0, num_positives=M, num_negatives=N)
    for b in range(4):
        record = records[b]
        texts = [tok.decode(ids) for ids in batch["text_ids"][b]]
        assert set(texts[:M]) <= set(record["captions"]) and len(set(texts[:M])) == M
        assert set(texts[M:]) <= set(record["negatives"]) and len(set(texts[M:])) == N
        ids, mask = tok(texts)
        assert np.array_equal(ids, batch["text_ids"][b]) and np.array_equal(mask, batch["text_mask"][b])
        mel, longer = clap_pipeline.host_clap_features(record["waveform"], np.random.default_rng(0))
        assert not longer and np.array_equal(mel, batch["mel_fusion"][b])  # repeat-padded: no randomness


def test_numpy_front_end_matches_clap_features():
    rng = np.random.default_rng(0)
    for seconds in (2.3, 10.0, 17.9):
        wave = (0.3 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
        ours, longer = clap_pipeline.host_clap_features(wave, np.random.default_rng(5))
        theirs, their_longer = clap_features.clap_audio_features(wave, rng=np.random.default_rng(5))
        assert longer == their_longer == (seconds > 10)
        np.testing.assert_allclose(ours, theirs, atol=1e-3)  # dB; same crop starts from the same rng


def _manifest(tmp_path, rows):
    return write_jsonl(tmp_path / "captions.jsonl", rows)


def test_a_missing_file_is_skipped_and_counted_and_short_lists_are_padded(tmp_path, tok):
    waves = [write_wav(tmp_path / f"clip{i}.wav", int16_tone(1.0 + 0.5 * i, freq=300.0 * (i + 1), seed=i))
             for i in range(4)]
    rows = [{"audio": str(waves[0]), "caption": "a tone", "negatives": ["a noise", "two beeps"], "id": "one"},
            {"audio": "missing.wav", "caption": "a tone", "id": "missing"},
            {"audio": waves[1].name, "text": ["a tone", "a steady tone"], "id": "two"},
            {"audio": str(waves[2]), "captions": ["a tone", "a low tone", "one tone", "a pure tone"], "id": "four",
             "negatives": ["a", "b", "c", "d", "e"]},
            {"audio": str(waves[3]), "caption": "a high tone", "id": "plain", "start": 0.5, "duration": 1.0}]
    cfg = {"sources": [{"kind": "caption_manifest", "path": str(_manifest(tmp_path, rows))}]}
    it = clap_pipeline.make_clap_iterator(cfg, tok, seed=1, batch_size=2, num_positives=M, num_negatives=N,
                                          epochs=1, shuffle=False)
    batches = list(it)
    assert len(batches) == 2 and it.num_skipped == 1
    assert it.skipped[0][0] == "missing" and "file not found" in it.skipped[0][1]
    valid = np.concatenate([b["negative_valid"] for b in batches])
    texts = [[tok.decode(ids) for ids in b["text_ids"][r]] for b in batches for r in range(2)]
    # manifest order (shuffle=False): one, two, four, plain
    assert valid.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert texts[0][:M] == ["a tone"] * M and sorted(texts[0][M:M + 2]) == ["a noise", "two beeps"]
    assert sorted(set(texts[1][:M])) == ["a steady tone", "a tone"]  # both used, one repeated
    assert len(set(texts[2][:M])) == M and set(texts[2][:M]) <= {"a tone", "a low tone", "one tone", "a pure tone"}
    assert texts[0][M + 2:] == ["", ""]  # padding slots: the empty text, masked by negative_valid
    first = batches[0]["text_mask"][0]
    assert first[M + 2].sum() == 1  # '' tokenises to '</s>' alone: never an all-zero attention row


def test_nothing_readable_stops_with_the_reason(tmp_path, tok):
    rows = [{"audio": f"gone{i}.wav", "caption": "x", "id": f"gone{i}"} for i in range(3)]
    cfg = {"sources": [{"kind": "caption_manifest", "path": str(_manifest(tmp_path, rows))}]}
    it = clap_pipeline.make_clap_iterator(cfg, tok, seed=0, batch_size=2, num_positives=1, num_negatives=0,
                                          max_consecutive_skips=6)
    with pytest.raises(bucketing.NoUsableDataError, match="6 records in a row.*file not found"):
        next(it)


def test_caption_manifest_formats_and_errors(tmp_path, caplog):
    wav = write_wav(tmp_path / "k1.flac", int16_tone(0.5))
    (tmp_path / "k1.json").write_text(json.dumps({"text": ["a dog barks", "barking"], "tag": ["dog"]}))
    write_wav(tmp_path / "k2.wav", int16_tone(0.5))
    (tmp_path / "k2.json").write_text(json.dumps({"text": "rain falls"}))
    (tmp_path / "sizes.json").write_text(json.dumps({"shard": 2}))
    folder = caption_manifests.read_caption_manifest(tmp_path)  # LAION webdataset members, unpacked
    assert [(r["id"], r["captions"], r["audio"]) for r in folder] == [
        ("k1", ["a dog barks", "barking"], str(wav)), ("k2", ["rain falls"], str(tmp_path / "k2.wav"))]

    sub = tmp_path / "m"
    sub.mkdir()
    compa = write_jsonl(sub / "compa.jsonl", [{"audio": "a.wav", "text": "a dog then a cat;a cat then a dog;a cow"}])
    assert caption_manifests.read_caption_manifest(compa)[0]["captions"] == ["a dog then a cat;a cat then a dog;a cow"]
    (record,) = caption_manifests.read_caption_manifest(compa, caption_format="compa")
    assert record["captions"] == ["a dog then a cat"] and record["negatives"] == ["a cat then a dog", "a cow"]
    assert record["audio"] == str(sub / "a.wav")
    both = write_jsonl(sub / "both.jsonl", [{"audio": "a.wav", "text": "p;n1", "negatives": ["n2;n3", "n4"]}])
    (record,) = caption_manifests.read_caption_manifest(both, caption_format="compa")
    assert record["captions"] == ["p"] and record["negatives"] == ["n1", "n2", "n3", "n4"]

    af2 = sub / "train.json"
    af2.write_text(json.dumps({"dataset_path": "/data/clotho", "split_path": "audio", "flamingo_task": "Clotho-Caps",
                               "data": {"1": {"name": "b.wav", "output": "wind", "audio_start": 2.0},
                                        "0": {"name": "a.wav", "captions": ["birds", "chirping"],
                                              "negatives": "a car"}}}))
    rows = caption_manifests.read_caption_manifest(af2)
    assert [r["audio"] for r in rows] == ["/data/clotho/audio/a.wav", "/data/clotho/audio/b.wav"]
    assert rows[0]["negatives"] == ["a car"] and rows[1]["start"] == 2.0 and rows[0]["id"] == "Clotho-Caps-0"
    listed = sub / "list.json"
    listed.write_text(json.dumps([{"path": "c.wav", "caption": "a bell"}]))
    assert caption_manifests.read_caption_manifest(listed)[0]["captions"] == ["a bell"]

    bad = write_jsonl(sub / "bad.jsonl", [{"audio": "a.wav", "caption": "ok"}, {"audio": "b.wav"},
                                          {"audio": "c.wav", "caption": ["fine", 3]},
                                          {"audio": "d.wav", "caption": "x", "negatives": {"no": 1}}])
    with pytest.raises(ManifestError, match=r"bad.jsonl: line 2: no caption"):
        caption_manifests.read_caption_manifest(bad)
    with caplog.at_level("WARNING"):
        kept = caption_manifests.read_caption_manifest(bad, strict=False)
    assert [r["audio"] for r in kept] == [str(sub / "a.wav")]
    assert any("skipped 3 bad caption rows" in r.getMessage() for r in caplog.records)
    for rows, message in (([{"audio": "a.wav", "caption": ["fine", 3]}], r"line 1: 'caption'\[1\] must be a string"),
                          ([{"audio": "a.wav", "caption": "  "}], r"line 1: 'caption'\[0\] is an empty caption"),
                          ([{"caption": "x"}], "line 1: no audio path"),
                          ([{"audio": "a.wav", "caption": "x", "duration": -1}], "line 1: 'duration' must be")):
        with pytest.raises(ManifestError, match=message):
            caption_manifests.read_caption_manifest(write_jsonl(sub / "one.jsonl", rows))
    with pytest.raises(ManifestError, match="empty part"):
        caption_manifests.read_caption_manifest(write_jsonl(sub / "one.jsonl", [{"audio": "a", "text": "x;;y"}]),
                                                caption_format="compa")
    with pytest.raises(ValueError, match="has no captions"):
        clap_pipeline.make_clap_iterator({"sources": [{"kind": "synthetic"}]}, None, seed=0, batch_size=1,
                                         num_positives=1, num_negatives=0)


def test_resume_gives_the_same_next_batches(tmp_path, tok):
    long_wav = write_wav(tmp_path / "long.wav", int16_tone(14.0, seed=3))  # fusion crops: drawn from the rng
    rows = [{"audio": str(long_wav), "captions": ["a long tone", "a steady hum", "a tone"], "id": "long"},
            {"audio": "missing.wav", "caption": "gone", "id": "missing"}]
    cfg = {"sources": [{"kind": "synthetic_captions", "num_examples": 16, "weight": 3.0},
                       {"kind": "caption_manifest", "path": str(_manifest(tmp_path, rows)), "weight": 1.0}]}
    kwargs = dict(seed=3, batch_size=2, num_positives=2, num_negatives=3)
    it = clap_pipeline.make_clap_iterator(cfg, tok, **kwargs)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # small JSON
    expected = [next(it) for _ in range(4)]
    fresh = clap_pipeline.make_clap_iterator(cfg, tok, **kwargs)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(4)]
    assert all(_same(a, b) for a, b in zip(expected, got))
    assert fresh.num_skipped == it.num_skipped >= 1
    assert sum(int(b["longer"].sum()) for b in expected) >= 1  # the long clip's crops are resumed too
    other = clap_pipeline.make_clap_iterator(cfg, tok, **dict(kwargs, seed=4))
    assert not _same(next(other), next(clap_pipeline.make_clap_iterator(cfg, tok, **kwargs)))


def test_processes_cover_an_epoch_exactly_once(tok):
    cfg = _synthetic(n=30, skills=["count", "order"])
    ids = []
    for p in range(3):
        records = clap_pipeline.make_clap_record_dataset(cfg, seed=5, num_positives=1, num_negatives=1,
                                                         process_index=p, process_count=3, epochs=1)
        ids += [records[i]["id"] for i in range(len(records))]
    assert sorted(ids) == sorted(f"synthetic-train-2-{i}" for i in range(30))
    batches = list(clap_pipeline.make_clap_iterator(cfg, tok, seed=5, batch_size=5, num_positives=1,
                                                    num_negatives=1, process_index=2, process_count=3, epochs=1))
    assert len(batches) == 2 and all(b["mel_fusion"].shape[0] == 5 for b in batches)


def test_clips_over_ten_seconds_are_longer(tmp_path, tok):
    rows = [{"audio": str(write_wav(tmp_path / f"c{s}.wav", int16_tone(s, seed=int(s)))), "caption": caption}
            for s, caption in ((10.0, "a short tone"), (12.5, "a long tone"))]
    cfg = {"sources": [{"kind": "caption_manifest", "path": str(_manifest(tmp_path, rows))},
                       {"kind": "synthetic_captions", "num_examples": 1, "skills": ["long_order"]}]}
    it = clap_pipeline.make_clap_iterator(cfg, tok, seed=0, batch_size=1, num_positives=1, num_negatives=2,
                                          shuffle=False)
    seen = {}
    for _ in range(3):  # the blend alternates sources: c10, the 5-minute clip, c12.5
        batch = next(it)
        mel = batch["mel_fusion"][0]
        seen[tok.decode(batch["text_ids"][0, 0])] = bool(batch["longer"][0])
        copies = all(np.array_equal(mel[0], mel[c]) for c in range(1, 4))
        assert copies != bool(batch["longer"][0])  # 4 copies of one mel, or the whole clip resized + 3 crops
    long_caption = next(k for k in seen if k not in ("a short tone", "a long tone"))
    assert "five-minute" in long_caption or "beep" in long_caption or "noise" in long_caption
    assert seen == {"a short tone": False, "a long tone": True, long_caption: True}


@pytest.mark.slow  # ~18 s on 2 cores: two spawned workers import the data stack
def test_worker_processes_give_the_single_process_batches_and_resume(tok):
    kwargs = dict(seed=1, batch_size=2, num_positives=2, num_negatives=2)
    single = clap_pipeline.make_clap_iterator(_synthetic(n=16), tok, **kwargs)
    it = clap_pipeline.make_clap_iterator(_synthetic(n=16), tok, num_workers=2, **kwargs)
    first = next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    it.close()
    fresh = clap_pipeline.make_clap_iterator(_synthetic(n=16), tok, num_workers=2, **kwargs)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(2)]
    fresh.close()
    assert all(_same(a, b) for a, b in zip(expected, got))
    assert tuple(sorted(first)) == tuple(sorted(next(single)))
