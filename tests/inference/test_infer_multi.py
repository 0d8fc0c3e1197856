"""launch/infer.py with several audios per prompt and with retrieved few-shot prompts (--shots K --index DIR), on a
random tiny AF2 with the media-location mask. Answers are checked against generate_tokens on inputs built here
from the files (the prompt text written out, the clips read with af2_jax.audio.io), the retrieved examples against
a numpy nearest-neighbour search."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax import pretrained
from af2_jax.audio.io import load_audio
from af2_jax.audio.mel import log_mel
from af2_jax.audio.windows import make_windows
from af2_jax.data.synthetic_icl import icl_tokenizer
from af2_jax.inference.generate import answer_text, generate_tokens, left_pad, pad_audios
from af2_jax.inference.sampling import SamplingConfig
from af2_jax.models.af2 import AF2Model, af2_preset
from af2_jax.tokenizer import with_token_ids
from tests.data.helpers import int16_tone, write_jsonl, write_wav
from tests.scripts import load_script

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    tokenizer = icl_tokenizer()
    config = af2_preset("tiny", max_windows=1, media_location_mask=True)
    config = dataclasses.replace(config, htsat=dataclasses.replace(config.htsat, depths=(2, 2, 2, 2)),
                                 llm=dataclasses.replace(config.llm, vocab_size=len(tokenizer)))
    config = with_token_ids(config, tokenizer)
    model = AF2Model(config, rngs=nnx.Rngs(3))
    pretrained.save(root / "model", config, model, tokenizer=tokenizer)
    clips = {}
    for i, (seconds, freq) in enumerate([(2.0, 300.0), (3.0, 600.0), (1.5, 1200.0), (2.5, 2400.0), (2.0, 450.0),
                                         (3.0, 900.0), (1.0, 3000.0)]):
        clips[f"c{i}"] = str(write_wav(root / f"c{i}.wav", int16_tone(seconds, freq, seed=i)))
    return root, tokenizer, pretrained.load_model(root / "model"), clips


def _windows(path):
    return make_windows(load_audio(path, duration=10.0), 1)


def _reference(model, tokenizer, paths, text):
    """The answer greedy generation gives for these clips and this prompt text, alone in its batch."""
    audio, mask = pad_audios([[_windows(p) for p in paths]])
    if len(paths) == 1:
        audio, mask = audio[:, 0], mask[:, 0]
    ids, attention = left_pad([tokenizer.encode(text)], tokenizer.pad_id)
    tokens = generate_tokens(model, audio, mask, ids, attention, SamplingConfig(max_new_tokens=NEW_TOKENS))
    return answer_text(tokenizer, tokens[0])


def test_several_audio_per_prompt_command_line_and_manifest(tmp_path, setup, capsys):
    root, tokenizer, model, clips = setup
    out = tmp_path / "answers.jsonl"
    args = ["--checkpoint", str(root / "model"), "--max-new-tokens", str(NEW_TOKENS), "--no-progress"]
    infer = load_script("launch/infer.py")
    code = infer.main(args + [
        "--audio", clips["c0"], "--audio", clips["c1"], "--prompt", "<audio>A beep. <audio>What is THIS?",
        "--audio", clips["c2"], "--prompt", "what is this sound called?",
        "--audio", clips["c3"], "--audio", clips["c4"], "--prompt", "only one <audio> here",
        "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "holds 1 <audio> tokens for 2 clip(s)" in err and "one <audio> per clip" in err
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["0"]["audio"] == [clips["c0"], clips["c1"]] and rows["2"]["error"]
    assert rows["0"]["answer"] == _reference(model, tokenizer, [clips["c0"], clips["c1"]],
                                             "<audio>a beep. <audio>what is this?<SEP>")
    assert rows["1"]["answer"] == _reference(model, tokenizer, [clips["c2"]],
                                             "<audio>what is this sound called?<SEP>")
    # a manifest row with a list of paths is the same request
    manifest = write_jsonl(tmp_path / "q.jsonl", [{"id": "m", "audio": ["c0.wav", "c1.wav"],
                                                   "prompt": "<audio>A beep. <audio>What is THIS?"}])
    (tmp_path / "c0.wav").symlink_to(clips["c0"])
    (tmp_path / "c1.wav").symlink_to(clips["c1"])
    assert infer.main(args + ["--manifest", str(manifest), "--output", str(tmp_path / "m.jsonl")]) == 0
    row = json.loads((tmp_path / "m.jsonl").read_text())
    assert row["answer"] == rows["0"]["answer"] and row["audio"] == [str(tmp_path / "c0.wav"), str(tmp_path / "c1.wav")]


def test_argument_errors(setup):
    root, _, _, clips = setup
    infer = load_script("launch/infer.py")
    base = ["--checkpoint", str(root / "model")]
    for bad in (["--prompt", "q", "--audio", clips["c0"]],  # a prompt before its audio
                ["--audio", clips["c0"], "--prompt", "q", "--audio", clips["c1"]],  # an audio without prompt
                ["--audio", clips["c0"], "--prompt", "q", "--shots", "2"],  # shots without an index
                ["--audio", clips["c0"], "--prompt", "q", "--index", "x"]):  # an index without shots
        with pytest.raises(SystemExit):
            infer.main(base + bad)


def test_retrieved_shots(tmp_path, setup, capsys):
    root, tokenizer, model, clips = setup
    train = [{"id": f"t{i}", "audio": clips[f"c{i}"], "prompt": "what is this sound called?", "answer": f"w{i}"}
             for i in range(6)]
    manifest = write_jsonl(tmp_path / "train.jsonl", train)
    build_index = load_script("launch/build_index.py")
    assert build_index.main(["--model", str(root / "model"), "--manifest", str(manifest), "--out",
                             str(tmp_path / "index"), "--no-progress"]) == 0
    out = tmp_path / "answers.jsonl"
    infer = load_script("launch/infer.py")
    code = infer.main(["--checkpoint", str(root / "model"), "--max-new-tokens", str(NEW_TOKENS),
                       "--no-progress", "--shots", "2", "--index", str(tmp_path / "index"),
                       "--audio", clips["c6"], "--prompt", "What is this sound called?",  # not indexed
                       "--audio", clips["c1"], "--prompt", "What is this sound called?",  # its own file
                       "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    # reference neighbours: cosine of HTSAT's mean-pooled tokens, numpy, the query's own file left out
    run = nnx.jit(lambda m, x: m.htsat(log_mel(x), train=False))

    def pooled(path):
        tokens = np.asarray(run(model, jnp.asarray(_windows(path)[None])), np.float64)[0, 0].mean(axis=0)
        return tokens / np.linalg.norm(tokens)

    bank = np.stack([pooled(t["audio"]) for t in train])
    for item, query in (("0", "c6"), ("1", "c1")):
        scores = bank @ pooled(clips[query])
        order = [i for i in np.argsort(-scores) if train[i]["audio"] != clips[query]]
        assert sorted(rows[item]["shots"]) == sorted(f"t{i}" for i in order[:2])
        shots = [train[int(s[1:])] for s in rows[item]["shots"]]  # in the order the prompt shows them
        text = ("here are similar examples. " + "".join(
            f"<audio>what is this sound called?<SEP>{s['answer']}<|endofchunk|>" for s in shots)
            + "<audio>what is this sound called?<SEP>")
        assert rows[item]["answer"] == _reference(model, tokenizer, [s["audio"] for s in shots] + [clips[query]],
                                                  text)
    # random examples: two distinct files, never the query's
    code = infer.main(["--checkpoint", str(root / "model"), "--max-new-tokens", str(NEW_TOKENS),
                       "--no-progress", "--shots", "2", "--index", str(tmp_path / "index"),
                       "--shot-selection", "random", "--audio", clips["c1"], "--prompt", "what?",
                       "--output", str(out)])
    shots = json.loads(out.read_text())["shots"]
    assert code == 0 and len(set(shots)) == 2 and "t1" not in shots
