"""The Grain pipeline: batch layout, exact resume, per-process coverage, bad records skipped and counted,
and padding to the batch's largest window count."""
import numpy as np
import pytest
import grain

from af2_jax.audio.windows import WINDOW_SAMPLES
from af2_jax.data import bucketing, config, pipeline, synthetic
from af2_jax.data.batching import BATCH_KEYS
from af2_jax.data.examples import Skipped
from tests.data.helpers import int16_tone, write_jsonl, write_wav

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def tok():
    return synthetic.synthetic_tokenizer()


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_keys_dtypes_and_text_layout(tok):
    it = pipeline.make_iterator(config.default_synthetic_config("train", num_examples=16), tok, seed=0,
                                batch_size=4, max_windows=2, max_tokens=MAX_TOKENS)
    batch = next(it)
    assert tuple(sorted(batch)) == tuple(sorted(BATCH_KEYS))
    assert batch["audio"].shape == (4, 1, WINDOW_SAMPLES) and batch["audio"].dtype == np.float32
    assert batch["audio_mask"].dtype == np.float32 and batch["audio_mask"].shape == (4, 1)
    for key, dtype in (("input_ids", np.int32), ("attention_mask", np.int32), ("loss_mask", np.float32)):
        assert batch[key].shape == (4, MAX_TOKENS) and batch[key].dtype == dtype
    for ids, attention, loss in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
        n = int(attention.sum())
        assert np.all(attention[:n] == 1) and np.all(ids[n:] == tok.pad_id)  # right padding
        assert ids[0] == tok.audio_id and ids[n - 1] == tok.eos_id
        sep = int(np.flatnonzero(ids == tok.sep_id)[0])
        assert np.array_equal(np.flatnonzero(loss), np.arange(sep + 1, n))  # answer .. <|endofchunk|> <eos>


def test_resume_gives_the_same_next_batches(tok):
    cfg = config.default_synthetic_config("train", stage=3, num_examples=64)
    kwargs = dict(seed=3, batch_size=2, max_windows=2, max_tokens=MAX_TOKENS)
    it = pipeline.make_iterator(cfg, tok, **kwargs)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = pipeline.make_iterator(cfg, tok, **kwargs)
    fresh.set_state(state)
    assert all(_same(a, b) for a, b in zip(expected, [next(fresh) for _ in range(3)]))
    other_seed = pipeline.make_iterator(cfg, tok, **dict(kwargs, seed=4))
    assert not _same(next(other_seed), next(pipeline.make_iterator(cfg, tok, **kwargs)))


def test_processes_cover_an_epoch_exactly_once(tok):
    cfg = {"sources": [{"kind": "synthetic", "num_examples": 30, "skills": ["count"]}]}
    ids = []
    for p in range(3):
        records = pipeline.make_record_dataset(cfg, seed=5, process_index=p, process_count=3, epochs=1)
        ids += [records[i]["id"] for i in range(len(records))]
    assert sorted(ids) == sorted(f"synthetic-train-0-{i}" for i in range(30))
    # And the full pipeline of one process yields exactly its share, in whole batches.
    batches = list(pipeline.make_iterator(cfg, tok, seed=5, batch_size=5, max_windows=1, max_tokens=MAX_TOKENS,
                                          process_index=1, process_count=3, epochs=1))
    assert len(batches) == 2


def test_blend_follows_the_weights():
    cfg = {"sources": [{"kind": "synthetic", "num_examples": 50, "skills": ["count"], "weight": 3.0},
                       {"kind": "synthetic", "num_examples": 50, "skills": ["pitch"], "weight": 1.0}]}
    records = pipeline.make_record_dataset(cfg, seed=0)
    skills = [records[i]["skill"] for i in range(400)]
    assert skills.count("count") == 300 and skills.count("pitch") == 100


def test_bad_records_are_skipped_counted_and_named(tmp_path, tok):
    good = [write_wav(tmp_path / f"good{i}.wav", int16_tone(1.0 + i, seed=i)) for i in range(4)]
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF not really audio" * 10)
    empty = write_wav(tmp_path / "empty.wav", np.zeros(0, np.int16))
    rows = [{"audio": str(p), "prompt": "what is it?", "answer": "a tone", "id": p.stem} for p in good]
    rows[2:2] = [{"audio": str(corrupt), "prompt": "q", "answer": "a", "id": "corrupt"},
                 {"audio": str(tmp_path / "missing.wav"), "prompt": "q", "answer": "a", "id": "missing"},
                 {"audio": str(empty), "prompt": "q", "answer": "a", "id": "empty"}]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    it = pipeline.make_iterator({"sources": [{"kind": "jsonl", "path": str(manifest)}]}, tok, seed=0, batch_size=2,
                                max_windows=1, max_tokens=MAX_TOKENS, epochs=1)
    batches = list(it)
    assert len(batches) == 2 and all(b["audio"].shape[0] == 2 for b in batches)
    assert it.num_skipped == 3
    assert sorted(record_id for record_id, _ in it.skipped) == ["corrupt", "empty", "missing"]
    reasons = dict(it.skipped)
    assert "not found" in reasons["missing"]


def test_each_bad_record_is_reported_once_then_counted_across_passes(tmp_path, tok, caplog):
    rows = [{"audio": str(write_wav(tmp_path / f"good{i}.wav", int16_tone(1.0, seed=i))), "prompt": "what is it?",
             "answer": "a tone", "id": f"good{i}"} for i in range(3)]
    rows.append({"audio": str(tmp_path / "missing.wav"), "prompt": "q", "answer": "a", "id": "missing"})
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    it = pipeline.make_iterator({"sources": [{"kind": "jsonl", "path": str(manifest)}]}, tok, seed=0, batch_size=3,
                                max_windows=1, max_tokens=MAX_TOKENS)  # repeats forever, as training does
    with caplog.at_level("WARNING"):
        for _ in range(6):  # six passes over the manifest
            next(it)
    assert it.num_skipped >= 5  # (a pass's skip is reported with the batch after it)
    assert sum("skipped record missing" in r.getMessage() for r in caplog.records) == 1
    assert any("were skipped" in r.getMessage() for r in caplog.records) is False  # 1 in 4 is under the alarm


def test_a_high_skipped_share_is_warned_about_once(caplog):
    counts = [1, 0, 0, 0] * 40  # three of every four records unusable
    it = iter(_bucketed(counts, batch_size=2))
    with caplog.at_level("WARNING"):
        batches = list(it)
    assert len(batches) == 20
    share = [r.getMessage() for r in caplog.records if "were skipped" in r.getMessage()]
    assert len(share) == 1 and "%" in share[0]


def test_nothing_usable_left_stops_the_stream_with_the_reason():
    it = iter(_bucketed([0] * 30, batch_size=2, max_consecutive_skips=25))
    with pytest.raises(bucketing.NoUsableDataError, match="25 records in a row could not be used.*ex24: broken"):
        next(it)
    ok = iter(_bucketed([0] * 24 + [1, 1], batch_size=2, max_consecutive_skips=25))
    assert next(ok)["audio"].shape[0] == 2  # 24 in a row is still under the limit


def _fake_examples(window_counts):
    """Examples whose audio encodes (index, window) so a batch row can be traced back."""
    examples = []
    for i, n in enumerate(window_counts):
        if n == 0:
            examples.append(Skipped(f"ex{i}", "broken"))
            continue
        windows = np.zeros((n, WINDOW_SAMPLES), np.float32)
        windows[:, 0] = i + 1
        windows[:, 1] = np.arange(1, n + 1)
        examples.append({"id": f"ex{i}", "windows": windows, "input_ids": np.array([1, 2, 3], np.int32),
                         "loss_mask": np.array([0, 1, 1], np.float32)})
    return examples


def _bucketed(counts, batch_size=2, max_pending=None, window_buckets=(),
              max_consecutive_skips=bucketing.MAX_CONSECUTIVE_SKIPS):
    ds = bucketing.BucketBatchIterDataset(grain.MapDataset.source(_fake_examples(counts)), batch_size=batch_size,
                                          pad_id=0, max_tokens=4, max_pending=max_pending,
                                          window_buckets=window_buckets, max_consecutive_skips=max_consecutive_skips)
    return pipeline.AccountingIterDataset(ds)


def test_batches_pad_to_their_largest_window_count_and_group_similar_lengths():
    counts = [1, 3, 1, 3, 2, 0, 1, 2, 3, 1, 3]  # every count fills whole batches: nothing left at the end
    it = iter(_bucketed(counts, max_pending=8))
    seen = []
    for batch in it:
        for row, mask in zip(batch["audio"], batch["audio_mask"]):
            index = int(row[0, 0]) - 1
            n = counts[index]
            seen.append(index)
            # Independent: the row's real windows first, then zero windows with mask 0, width = the batch max.
            assert batch["audio"].shape[1] == max(counts[int(r[0, 0]) - 1] for r in batch["audio"])
            assert np.array_equal(mask, (np.arange(batch["audio"].shape[1]) < n).astype(np.float32))
            assert np.array_equal(row[:n, 1], np.arange(1, n + 1)) and not row[n:].any()
    assert sorted(seen) == [i for i, n in enumerate(counts) if n]  # every good example once
    assert it.num_skipped == 1
    assert it.padding_fraction == 0.0  # exact buckets exist for every count here
    mixed = iter(_bucketed([1, 3, 1, 3], batch_size=2, max_pending=2))
    list(mixed)
    assert mixed.padding_fraction == pytest.approx(4 / 12)  # forced out early: two [1, 3] batches, 2 x 3 windows


def test_window_buckets_group_and_pad_to_the_smallest_bucket_that_holds_the_clips():
    counts = [1, 5, 2, 4, 1, 6, 3, 2, 8, 3, 6, 8]  # every bucket fills whole batches: nothing left at the end
    buckets = (1, 3, 6)  # 8 windows lie beyond the last bucket: padded to the batch's largest count
    it = iter(_bucketed(counts, batch_size=2, max_pending=12, window_buckets=buckets))
    widths, seen = [], []
    for batch in it:
        rows = [int(r[0, 0]) - 1 for r in batch["audio"]]
        seen += rows
        largest = max(counts[i] for i in rows)
        expected = min([b for b in buckets if b >= largest], default=largest)
        assert batch["audio"].shape[1] == expected
        for row, mask, index in zip(batch["audio"], batch["audio_mask"], rows):
            n = counts[index]
            assert np.array_equal(mask, (np.arange(expected) < n).astype(np.float32)) and not row[n:].any()
        widths.append(expected)
    assert sorted(seen) == list(range(len(counts)))
    assert sorted(set(widths)) == [1, 3, 6, 8]  # 4 compiled shapes for 6 distinct counts
    assert it.padding_fraction == pytest.approx(1 - sum(counts) / sum(2 * w for w in widths))


def test_resume_restores_pending_buckets():
    counts = [1, 2, 3, 1, 0, 2, 3, 3, 1, 2, 2, 1, 3, 1, 2]
    it = iter(_bucketed(counts, max_pending=6))
    next(it)
    state = it.get_state()
    assert state["parent"]["pending"]  # the interesting case: examples waiting in buckets
    rest = list(it)
    fresh = iter(_bucketed(counts, max_pending=6))
    fresh.set_state(state)
    again = list(fresh)
    assert len(rest) == len(again) and all(_same(a, b) for a, b in zip(rest, again))
    assert fresh.num_skipped == it.num_skipped


@pytest.mark.slow
def test_multiprocess_workers_resume_exactly(tok):
    cfg = config.default_synthetic_config("train", num_examples=32)
    kwargs = dict(seed=1, batch_size=2, max_windows=1, max_tokens=MAX_TOKENS, num_workers=2)
    it = pipeline.make_iterator(cfg, tok, **kwargs)
    first = next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    it.close()
    fresh = pipeline.make_iterator(cfg, tok, **kwargs)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(3)]
    fresh.close()
    assert all(_same(a, b) for a, b in zip(expected, got))
    single = pipeline.make_iterator(cfg, tok, **dict(kwargs, num_workers=0))
    assert tuple(sorted(first)) == tuple(sorted(next(single)))
