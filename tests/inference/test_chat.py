"""launch/chat.py: a scripted session through the command. The history is kept (each turn's prompt written out
here), audio attached at a later turn gets its <audio> there, and the streamed answer equals what the batched
generation (generate_tokens' on-device loop) gives for the same prompt."""
import io
import json

from af2_jax.inference.generate import answer_text, generate_tokens, left_pad
from af2_jax.inference.sampling import SamplingConfig
from tests.inference.test_infer_multi import _windows, setup  # noqa: F401  (the module's model fixture)
from tests.scripts import load_script

NEW_TOKENS = 5


def _batched(model, tokenizer, paths, text):
    from af2_jax.inference.generate import pad_audios

    audio, mask = pad_audios([[_windows(p) for p in paths]])
    if len(paths) == 1:
        audio, mask = audio[:, 0], mask[:, 0]
    ids, attention = left_pad([tokenizer.encode(text)], tokenizer.pad_id)
    return answer_text(tokenizer, generate_tokens(model, audio, mask, ids, attention,
                                                  SamplingConfig(max_new_tokens=NEW_TOKENS))[0])


def test_scripted_session_keeps_history_and_streams_the_batched_answer(tmp_path, setup, capsys):  # noqa: F811
    root, tokenizer, model, clips = setup
    script = "\n".join(["How many beeps are there?", "and one more than that?", "/audio " + clips["c2"],
                        "which one is longer?", "/audio " + str(tmp_path / "missing.wav"), "/bogus", "/history",
                        "/quit", "never asked"]) + "\n"
    out = io.StringIO()
    chat = load_script("launch/chat.py")
    code = chat.main(["--checkpoint", str(root / "model"), "--audio", clips["c0"], "--max-new-tokens",
                      str(NEW_TOKENS), "--transcript", str(tmp_path / "t.json")], stdin=io.StringIO(script),
                     stdout=out)
    err = capsys.readouterr().err
    assert code == 1 and "missing.wav" in err and "unknown command /bogus" in err
    turns = json.loads((tmp_path / "t.json").read_text())
    assert [t["question"] for t in turns] == ["How many beeps are there?", "and one more than that?",
                                              "which one is longer?"]
    a = [t["answer"] for t in turns]
    round1 = f"user: how many beeps are there? \nassistant: <SEP>{a[0]}<|endofchunk|><|endoftext|>\n"
    round2 = f"user: and one more than that? \nassistant: <SEP>{a[1]}<|endofchunk|><|endoftext|>\n"
    prompts = ["the task is dialog. <audio>user: how many beeps are there? \nassistant: <SEP>",
               "the task is dialog. <audio>" + round1 + "user: and one more than that? \nassistant: <SEP>",
               "the task is dialog. <audio>" + round1 + round2 + "<audio>user: which one is longer? \nassistant: "
               "<SEP>"]
    assert [t["prompt"] for t in turns] == prompts
    assert turns[2]["audio"] == [clips["c0"], clips["c2"]] and turns[2]["audio_turns"] == [0, 2]
    # what was printed, token by token, is the answer; and it is the batched generation's answer
    lines = out.getvalue().splitlines()
    streamed = [line.removeprefix("assistant: ").strip() for line in lines if line.startswith("assistant: ")]
    assert streamed[:3] == a and streamed[3:] == a  # the three answers, then /history's
    assert f"user: and one more than that?\nassistant: {a[1]}" in out.getvalue()  # /history
    for turn, paths in zip(turns, ([clips["c0"]], [clips["c0"]], [clips["c0"], clips["c2"]])):
        assert turn["answer"] == _batched(model, tokenizer, paths, turn["prompt"])
    # the batched path through the command gives the same session
    again = io.StringIO()
    assert chat.main(["--checkpoint", str(root / "model"), "--audio", clips["c0"], "--max-new-tokens",
                      str(NEW_TOKENS), "--no-stream"], stdin=io.StringIO("\n".join(script.split("\n")[:4])),
                     stdout=again) == 0
    assert [line.removeprefix("assistant: ").strip() for line in again.getvalue().splitlines()] == a


def test_question_before_any_audio_and_bad_checkpoint(tmp_path, setup, capsys):  # noqa: F811
    root, _, _, _ = setup
    out = io.StringIO()
    chat = load_script("launch/chat.py")
    assert chat.main(["--checkpoint", str(root / "model")], stdin=io.StringIO("hello?\n"), stdout=out) == 1
    assert "attach an audio file first" in capsys.readouterr().err and out.getvalue() == ""
    assert chat.main(["--checkpoint", str(tmp_path / "none")], stdin=io.StringIO("")) == 2
    assert "none" in capsys.readouterr().err

