"""Talk with AF2 about audio files, turn after turn (Audio Flamingo 1's chat format with AF2's tokens).

    python launch/chat.py --checkpoint runs/icl/model --audio clip.wav
    > how many beeps are there?
    assistant: two
    > and one more than that?
    assistant: three
    > /audio other.wav
    > and in this one?

Every turn re-asks the whole dialogue (`the task is dialog. <audio>user: q1 \\nassistant: <SEP>a1<|endofchunk|>
<|endoftext|>\\n user: q2 ...`, docs/ICL.md), so the model sees its earlier answers. Audio files come with --audio
(attached to the first question) or a `/audio PATH` line at any turn (attached to the next question: one `<audio>`
there); a model with the media-location mask then lets each turn see the clips attached up to it. The answer is
printed token by token as it is generated (a Python loop over the model's jitted prefill and decode_step);
--no-stream generates it in one batched call instead. Commands: /audio PATH, /history, /reset (forget the dialogue
and its audio), /quit (or end of input). --script FILE reads the lines from a file; --transcript FILE writes every
turn (prompt text, answer, audio files) as JSON. --cot asks in the AF2-SoundCoT format (1024-token limits).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import af2_jax  # noqa: E402,F401  (package-wide flax settings)


def build_parser() -> argparse.ArgumentParser:
    from af2_jax.inference.serving import add_serving_arguments

    p = argparse.ArgumentParser(prog="chat.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="an AF2 model directory (ours), or a training workdir")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's tokenizer/)")
    p.add_argument("--audio", action="append", default=[], help="audio file attached to the first question (repeat)")
    p.add_argument("--script", default=None, help="read the user's lines from this file instead of stdin")
    p.add_argument("--transcript", default=None, help="write the session's turns here as JSON")
    p.add_argument("--max-windows", type=int, default=None, help="10 s windows read per file (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128 as AF1's chat (--cot: 1024)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cot", action="store_true",
                   help="AF2-SoundCoT prompt: tag instruction appended, 1024-token prompt and answer limits")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="generate each answer in one batched call (no token-by-token output)")
    add_serving_arguments(p)
    return p


class ChatSession:
    """The dialogue so far: answered rounds, the clips and the round each was attached to."""

    def __init__(self):
        self.history: list[tuple[str, str]] = []
        self.clips: list = []
        self.files: list[str] = []
        self.audio_turns: list[int] = []

    def attach(self, path: str, windows) -> None:
        self.clips.append(windows)
        self.files.append(path)
        self.audio_turns.append(len(self.history))  # the next question's round


def main(argv: list[str] | None = None, *, stdin=None, stdout=None) -> int:
    args = build_parser().parse_args(argv)
    stdin = stdin or (open(args.script, encoding="utf-8") if args.script else sys.stdin)
    stdout = stdout or sys.stdout
    if args.max_windows is not None and args.max_windows < 1:
        print("error: --max-windows must be >= 1", file=sys.stderr)
        return 2

    import jax

    from af2_jax.audio.io import AudioError
    from af2_jax.audio.windows import pad_batch
    from af2_jax.inference.generate import answer_text, generate_tokens, left_pad, pad_audios
    from af2_jax.inference.requests import (TextStream, TokenStreamer, load_answering_model, load_windows,
                                            text_prompt_ids)
    from af2_jax.inference.sampling import SamplingConfig
    from af2_jax.inference.serving import serving_options
    from af2_jax.param_tree import ConversionError
    from af2_jax.tokenizer import COT_MAX_LEN, DEFAULT_MAX_LEN, TokenizerError, cot_prompt, format_chat_prompt

    max_prompt = COT_MAX_LEN if args.cot else DEFAULT_MAX_LEN
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (COT_MAX_LEN if args.cot else 128)
    try:
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  max_new_tokens=max_new, seed=args.seed)
        model, tokenizer, max_windows = load_answering_model(
            args.checkpoint, args.tokenizer, args.max_windows, serving_options(args))
    except (TokenizerError, ConversionError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    streamer = TokenStreamer(model) if args.stream else None
    base_key = jax.random.key(args.seed)
    session = ChatSession()
    transcript: list[dict] = []
    interactive = stdin is sys.stdin and sys.stdin.isatty()

    def attach(path: str) -> bool:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                windows = load_windows(path, max_windows)
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
        except (AudioError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return False
        session.attach(path, windows)
        return True

    def answer(question: str, turn: int) -> str | None:
        asked = cot_prompt(question) if args.cot else question
        text = format_chat_prompt(session.history, asked, audio_turns=session.audio_turns)
        try:
            ids = text_prompt_ids(tokenizer, text, audios=len(session.clips), max_prompt_tokens=max_prompt)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return None
        if len(session.clips) == 1:
            audio, audio_mask = pad_batch(session.clips)
        else:
            audio, audio_mask = pad_audios([session.clips])
        input_ids, attention = left_pad([ids], tokenizer.pad_id)
        key = jax.random.fold_in(base_key, turn)
        stdout.write("assistant: ")
        stdout.flush()
        if streamer is not None:
            pieces = TextStream(tokenizer)
            for token in streamer.stream(audio, audio_mask, input_ids, attention, sampling, key=key):
                piece = pieces.push(token)
                if piece:
                    stdout.write(piece)
                    stdout.flush()
            tokens = pieces.ids
        else:
            tokens = list(generate_tokens(model, audio, audio_mask, input_ids, attention, sampling, key=key,
                                          data_parallel=False)[0])
        reply = answer_text(tokenizer, tokens)
        if streamer is None:
            stdout.write(reply)
        elif pieces.shown.strip() != reply:  # a later <SEP> restarted the answer after some of it was shown
            stdout.write("\nassistant: " + reply)
        stdout.write("\n")
        stdout.flush()
        transcript.append({"turn": turn, "question": question, "prompt": text, "answer": reply,
                           "audio": list(session.files), "audio_turns": list(session.audio_turns)})
        return reply

    for path in args.audio:
        if not attach(path):
            return 2
    turn = 0
    failed = 0
    try:
        while True:
            if interactive:
                stdout.write("> ")
                stdout.flush()
            line = stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                session = ChatSession()
                continue
            if line == "/history":
                for question, reply in session.history:
                    stdout.write(f"user: {question}\nassistant: {reply}\n")
                continue
            if line.startswith("/audio"):
                path = line[len("/audio"):].strip()
                if not path:
                    print("error: /audio needs a file: /audio PATH", file=sys.stderr)
                    failed += 1
                elif not attach(path):
                    failed += 1
                continue
            if line.startswith("/"):
                print(f"error: unknown command {line.split()[0]} (/audio PATH, /history, /reset, /quit)",
                      file=sys.stderr)
                failed += 1
                continue
            if not session.clips:
                print("error: attach an audio file first (/audio PATH, or --audio)", file=sys.stderr)
                failed += 1
                continue
            reply = answer(line, turn)
            if reply is None:
                failed += 1
                continue
            session.history.append((line, reply))
            turn += 1
    finally:
        if args.transcript:
            pathlib.Path(args.transcript).write_text(json.dumps(transcript, indent=1, ensure_ascii=False) + "\n")
        if args.script:
            stdin.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
