"""Retrieval for few-shot prompts: faiss top-k against a numpy brute force, self / same-file exclusion, save and
reload, and launch/build_index.py end to end (embeddings checked against the models' own calls)."""
import json

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax import pretrained
from af2_jax.retrieval import fewshot, index as index_lib
from tests.data.helpers import int16_tone, write_jsonl, write_wav
from tests.scripts import load_script



def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_top_k_equals_brute_force(metric):
    rng = np.random.default_rng(0)
    base, queries = _unit(rng, 300, 24), _unit(rng, 20, 24)
    index = index_lib.build_index(base, [{"id": str(i)} for i in range(300)], metric=metric)
    scores, rows = index.search(queries, 10)
    b, q = base.astype(np.float64), queries.astype(np.float64)
    if metric == "ip":
        brute = q @ b.T
        order = np.argsort(-brute, axis=1)[:, :10]
    else:
        brute = ((q[:, None, :] - b[None]) ** 2).sum(-1)
        order = np.argsort(brute, axis=1)[:, :10]
    assert np.array_equal(rows, order)
    assert np.allclose(scores, np.take_along_axis(brute, order, 1), atol=1e-5)
    # unit vectors: squared L2 = 2 - 2 cos, so both metrics rank alike
    assert np.array_equal(order, np.argsort(-(q @ b.T), axis=1)[:, :10])


def test_save_reload_and_bad_directories(tmp_path):
    rng = np.random.default_rng(1)
    base = _unit(rng, 50, 8)
    entries = [{"id": f"e{i}", "audio": f"/x/{i}.wav", "prompt": "p", "answer": str(i)} for i in range(50)]
    index = index_lib.build_index(base, entries, metric="ip", embedding="af2-htsat", model="/m")
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / index_lib.ENTRIES_FILE).read_text())
    assert meta["entries"] == entries and meta["metric"] == "ip" and meta["dim"] == 8
    again = index_lib.load_index(tmp_path / "idx")
    queries = _unit(rng, 5, 8)
    assert all(np.array_equal(a, b) for a, b in zip(index.search(queries, 7), again.search(queries, 7)))
    assert (again.entries, again.embedding, again.model) == (entries, "af2-htsat", "/m")
    with pytest.raises(index_lib.IndexFileError, match="no index.faiss"):
        index_lib.load_index(tmp_path)
    (tmp_path / "idx" / index_lib.ENTRIES_FILE).write_text(json.dumps(dict(meta, entries=entries[:3])))
    with pytest.raises(index_lib.IndexFileError, match="do not belong together"):
        index_lib.load_index(tmp_path / "idx")
    with pytest.raises(ValueError):
        index_lib.build_index(base, entries[:3])


def test_shots_exclude_the_query_file_and_keep_one_entry_per_file():
    # 12 entries, 6 files (two entries each, e.g. two captions of one clip); ranking written by hand
    entries = [{"id": str(i), "audio": f"/data/f{i // 2}.wav"} for i in range(12)]
    rows = [4, 5, 0, 1, 9, 2, 8, 3, 11, -1]  # best first; -1 = fewer hits than asked
    query_file, query_row = "/data/./f2.wav", 4  # the query is entry 4, file f2 (also entry 5)
    chosen = fewshot.select_shots(rows, entries, 3, np.random.default_rng(0), query_file=query_file,
                                  query_row=query_row)
    files = [entries[r]["audio"] for r in chosen]
    # files in rank order after dropping f2: f0 (0, 1), f4 (9, 8), f1 (2, 3): the first three, one entry each
    assert sorted(files) == ["/data/f0.wav", "/data/f1.wav", "/data/f4.wav"]
    assert set(chosen) <= {0, 1, 9, 8, 2, 3}
    again = fewshot.select_shots(rows, entries, 3, np.random.default_rng(0), query_file=query_file,
                                 query_row=query_row)
    assert again == chosen  # seeded: reproducible
    orders = {tuple(fewshot.select_shots(rows, entries, 3, np.random.default_rng(s), query_file=query_file))
              for s in range(30)}
    assert len(orders) > 3  # shuffled, and a random entry per file
    every = fewshot.select_shots(rows, entries, 10, np.random.default_rng(0), query_file=query_file)
    assert sorted(entries[r]["audio"] for r in every) == [f"/data/f{i}.wav" for i in (0, 1, 4, 5)]  # f3 not hit
    picked = fewshot.random_shots(entries, 4, np.random.default_rng(3), query_file=query_file)
    assert len({entries[r]["audio"] for r in picked}) == 4 and all(entries[r]["audio"] != "/data/f2.wav"
                                                                     for r in picked)


@pytest.fixture(scope="module")
def clip_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    rows = []
    for i, (seconds, freq) in enumerate([(2.0, 300.0), (12.0, 500.0), (3.0, 900.0), (1.0, 1500.0),
                                         (4.0, 2500.0), (2.5, 700.0)]):
        rows.append({"id": f"c{i}", "audio": str(write_wav(root / f"c{i}.wav", int16_tone(seconds, freq, seed=i))),
                     "prompt": "what is it?", "answer": f"a{i}"})
    rows.append({"id": "broken", "audio": str(root / "missing.wav"), "prompt": "p", "answer": "a"})
    rows.append({"id": "pair", "audio": [rows[0]["audio"], rows[1]["audio"]], "prompt": ["p", "q"],
                 "answer": ["a", "b"]})
    return write_jsonl(root / "train.jsonl", rows), rows


def _first_10s(path):
    from af2_jax.audio.io import load_audio

    return load_audio(path, duration=10.0)


def test_build_index_command_with_an_af2_model(tmp_path, clip_manifest, capsys):
    from af2_jax.audio.mel import log_mel
    from af2_jax.audio.windows import make_windows
    from af2_jax.models.af2 import AF2Model, af2_preset

    manifest, rows = clip_manifest
    config = af2_preset("tiny", max_windows=1)
    config = dataclasses.replace(config, htsat=dataclasses.replace(config.htsat, depths=(2, 2, 2, 2)))
    model = AF2Model(config, rngs=nnx.Rngs(0))
    pretrained.save(tmp_path / "af2", config, model)
    out = tmp_path / "index"
    build_index = load_script("launch/build_index.py")
    code = build_index.main(["--model", str(tmp_path / "af2"), "--manifest", str(manifest), "--out", str(out),
                             "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 0 and "indexed 6 clips" in captured.out and "1 left out" in captured.out
    assert "missing.wav" in captured.err and "embedding clips" in captured.err  # the failure and the tqdm bar
    index = index_lib.load_index(out)
    assert [e["id"] for e in index.entries] == [f"c{i}" for i in range(6)] and index.embedding == "af2-htsat"
    assert index.entries[1]["answer"] == "a1" and index.model == str((tmp_path / "af2").absolute())
    # reference: HTSAT's tokens of each clip's first window, mean-pooled and normalised, in float64
    windows = np.stack([make_windows(_first_10s(r["audio"]), 1)[0] for r in rows[:6]])
    run = nnx.jit(lambda m, x: m.htsat(log_mel(x), train=False))  # jitted: eager HTSAT is slow on CPU
    tokens = np.asarray(run(model, jnp.asarray(windows[:, None])), np.float64)[:, 0]
    pooled = tokens.mean(axis=1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    stored = index.index.reconstruct_n(0, len(index))
    assert np.allclose(stored, pooled, atol=2e-5)
    # a query equal to clip 2 finds clip 2 first; as a query of its own file it is excluded
    _, found = index.search(stored[2:3], 3)
    assert found[0, 0] == 2
    shots = fewshot.retrieve_shots(index, stored[2:3], 3, query_files=[rows[2]["audio"]])[0]
    assert 2 not in shots and len(shots) == 3
    assert build_index.main(["--model", str(tmp_path / "af2"), "--manifest", str(manifest), "--out",
                             str(out), "--no-progress"]) == 2
    assert "already holds an index" in capsys.readouterr().err


@pytest.mark.slow
def test_build_index_command_with_an_afclap_model(tmp_path, clip_manifest):
    from af2_jax.audio.clap_features import clap_audio_features
    from af2_jax.evaluation.retrieval import embed_audio
    from af2_jax.models.afclap import AFCLAPModel, afclap_preset

    manifest, rows = clip_manifest
    config = afclap_preset("tiny", htsat=dict(depths=(2, 2, 2, 2)))
    model = AFCLAPModel(config, rngs=nnx.Rngs(1))
    pretrained.save(tmp_path / "clap", config, model)
    out = tmp_path / "index"
    build_index = load_script("launch/build_index.py")
    assert build_index.main(["--model", str(tmp_path / "clap"), "--manifest", str(manifest), "--out", str(out),
                             "--metric", "l2", "--no-progress"]) == 0
    index = index_lib.load_index(out)
    assert index.embedding == "afclap" and index.metric == "l2" and len(index) == 6
    # reference: AF-CLAP's features of the first 10 s (the 12 s clip is cut, as AF1 embeds 10 s) and its embedding
    features = [clap_audio_features(_first_10s(r["audio"])[:160000], quantize=False) for r in rows[:6]]
    expected = embed_audio(model, np.stack([f[0] for f in features]), np.array([f[1] for f in features]))
    assert not any(f[1] for f in features)
    assert np.allclose(index.index.reconstruct_n(0, 6), expected, atol=2e-5)
    assert np.allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)
