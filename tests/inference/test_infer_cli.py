"""launch/infer.py end to end: the fixture's weights converted to our format with a trained tiny tokenizer, WAV
files on disk, a JSONL manifest with a broken file among good ones."""
import json

import numpy as np
import pytest
import soundfile

from af2_jax import pretrained
from af2_jax.convert.af2_release import import_release, import_tokenizer
from af2_jax.inference.generate import answer_text, generate_tokens, left_pad
from af2_jax.inference.sampling import SamplingConfig
from af2_jax.tokenizer import encode_prompt, train_tiny_tokenizer
from tests.scripts import load_script



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, fixture_dir):
    directory = tmp_path_factory.mktemp("ckpt")
    words = [f"w{i}" for i in range(400)]
    tokenizer = train_tiny_tokenizer([" ".join(words[i:i + 7]) for i in range(0, 400, 3)] + ["what is this"],
                                     vocab_size=296)
    tokenizer.save(directory / "tok")
    config, params, _ = import_release(fixture_dir / "state_dict.safetensors", progress=False)
    tokenizer, config = import_tokenizer(directory / "tok", config)
    pretrained.save(directory / "model", config, params, tokenizer=tokenizer)
    return directory / "model", tokenizer


@pytest.mark.slow
def test_manifest_answers_and_bad_files(tmp_path, checkpoint, fixture_inputs, capsys):
    model_dir, tokenizer = checkpoint
    rates = 16000
    short = fixture_inputs["wav_pcm16_0"]  # 4.6 s
    long = fixture_inputs["wav_pcm16_1"]  # 13.7 s: cropped to --max-windows 1 (10 s) with a warning
    soundfile.write(tmp_path / "short.wav", short, rates, subtype="PCM_16")
    soundfile.write(tmp_path / "long.wav", long, rates, subtype="PCM_16")
    (tmp_path / "broken.wav").write_bytes(b"not audio at all")
    rows = [{"id": "a", "audio": "short.wav", "prompt": "What is this?"},
            {"id": "b", "audio": "broken.wav", "question": "w1 w2"},
            {"id": "c", "audio": "long.wav", "prompt": "w5 w6 w7"}]
    manifest = tmp_path / "questions.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    infer = load_script("launch/infer.py")
    code = infer.main(["--checkpoint", str(model_dir), "--manifest", str(manifest), "--output", str(out),
                       "--batch-size", "2", "--max-windows", "1", "--max-new-tokens", "5", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, "a failed item makes the exit code nonzero"
    assert "broken.wav" in err and "1 of 3 item(s) failed" in err
    assert "long.wav" in err and "first 10 s" in err  # the crop warning
    # written as they come: the failed read first, then the answers batch by batch (shortest audio first)
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == ["b", "a", "c"]
    assert "error" in answers[0] and "broken.wav" in answers[0]["error"]
    answers = {a["id"]: a for a in answers}

    # each answer is what greedy generation gives for that clip and question on its own
    from af2_jax.audio.io import load_audio
    from af2_jax.audio.windows import make_windows

    model = pretrained.load_model(model_dir)
    for row, name in ((answers["a"], "short.wav"), (answers["c"], "long.wav")):
        windows = make_windows(load_audio(tmp_path / name, duration=10.0), 1)
        ids, mask = left_pad([encode_prompt(tokenizer, row["prompt"])], tokenizer.pad_id)
        tokens = generate_tokens(model, windows[None], np.ones((1, 1)), ids, mask, SamplingConfig(max_new_tokens=5))
        assert row["answer"] == answer_text(tokenizer, tokens[0])
        assert "<|endofchunk|>" not in row["answer"] and "<|endoftext|>" not in row["answer"]


def test_argument_errors_and_missing_file(tmp_path, checkpoint, capsys):
    model_dir, _ = checkpoint
    cli = load_script("launch/infer.py")
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(model_dir), "--audio", "a.wav"])  # no matching --prompt
    code = cli.main(["--checkpoint", str(model_dir), "--audio", str(tmp_path / "gone.wav"), "--prompt", "q"])
    assert code == 1 and "gone.wav" in capsys.readouterr().err
    code = cli.main(["--checkpoint", str(tmp_path / "nothing"), "--audio", "a.wav", "--prompt", "q"])
    assert code == 2 and "nothing" in capsys.readouterr().err


def test_bad_output_path_and_limits_fail_before_any_work(tmp_path, checkpoint, capsys, fixture_inputs):
    model_dir, tokenizer = checkpoint
    cli = load_script("launch/infer.py")
    soundfile.write(tmp_path / "clip.wav", fixture_inputs["wav_pcm16_0"], 16000, subtype="PCM_16")
    clip = str(tmp_path / "clip.wav")
    code = cli.main(["--checkpoint", str(model_dir), "--audio", clip, "--prompt", "q", "--output",
                     str(tmp_path / "no" / "such" / "dir" / "a.jsonl")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = cli.main(["--checkpoint", str(model_dir), "--audio", clip, "--prompt", "q", "--max-windows", "13"])
    assert code == 2 and "exceeds what this model takes (12 windows" in capsys.readouterr().err
    long_prompt = " ".join(["w1"] * 600)  # the reference would cut its <SEP> off
    out = tmp_path / "a.jsonl"
    code = cli.main(["--checkpoint", str(model_dir), "--audio", clip, "--prompt", long_prompt, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "the limit is 512" in err and "1 of 1 item(s) failed" in err
    assert "limit is 512" in json.loads(out.read_text())["error"]
