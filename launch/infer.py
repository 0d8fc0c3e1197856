"""Ask AF2 about audio files.

    python launch/infer.py --checkpoint runs/s3 --audio clip.wav --prompt "what is the dog doing?"
    python launch/infer.py --checkpoint runs/s3 --audio a.wav --prompt "..." --audio b.flac --prompt "..."
    python launch/infer.py --checkpoint runs/s3 --manifest questions.jsonl --output answers.jsonl --batch-size 8

The checkpoint is a model in our pretrained format (config.json + params/ + tokenizer/), or a training workdir
(its final/ model). Prompts use the reference format
(`<audio>{question lowercased}<SEP>`); greedy by default (the reference's benchmark setting), or sampling with
--temperature/--top-k/--top-p/--seed. Up to --max-windows 10 s windows (default 30 = 5 min) are read per file;
longer audio is cropped with a warning. A file that cannot be read is reported by name and skipped; the exit code
is nonzero at the end if any item failed.
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
    p = argparse.ArgumentParser(prog="infer.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="an AF2 model directory (ours: config.json + params/ + tokenizer/), or a training workdir")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's tokenizer/)")
    p.add_argument("--audio", action="append", default=[], help="audio file (repeat, paired with --prompt)")
    p.add_argument("--prompt", action="append", default=[], help="question about the matching --audio")
    p.add_argument("--manifest", default=None, help="JSON/JSONL of {audio, prompt} objects (or an AF2 manifest)")
    p.add_argument("--output", default=None, help="write JSONL {id, audio, prompt, answer | error} here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=None,
                   help="10 s windows read per file (default: all the model takes, 30 = 5 min for AF2)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _items(args, parser):
    from af2_jax.inference.requests import Item, read_items

    if args.manifest and (args.audio or args.prompt):
        parser.error("give either --manifest or --audio/--prompt pairs, not both")
    if args.manifest:
        return read_items(args.manifest)
    if not args.audio or len(args.audio) != len(args.prompt):
        parser.error(f"--audio and --prompt must come in pairs (got {len(args.audio)} and {len(args.prompt)})")
    return [Item(str(i), a, q) for i, (a, q) in enumerate(zip(args.audio, args.prompt))]


def open_output(path: str | None):
    """The --output file, opened before any work so that a bad path fails at once (answers are written to it as
    they come, so a crash keeps every answer finished before it)."""
    if not path:
        return None
    target = pathlib.Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--output {path}: the directory {target.parent} does not exist")
    try:
        return open(target, "w", encoding="utf-8", buffering=1)
    except OSError as e:
        raise OSError(f"--output {path}: cannot write ({e.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.max_windows is not None and args.max_windows < 1):
        parser.error("--batch-size and --max-windows must be >= 1")

    import jax
    from tqdm import tqdm

    from af2_jax import pretrained
    from af2_jax.audio.io import AudioError
    from af2_jax.inference.generate import Request, answer_batch, check_tokenizer
    from af2_jax.inference.requests import RequestError, load_windows
    from af2_jax.inference.sampling import SamplingConfig
    from af2_jax.param_tree import ConversionError
    from af2_jax.tokenizer import DEFAULT_MAX_LEN, TokenizerError, check_prompt

    out = None
    try:
        items = _items(args, parser)
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed)
        model_dir = pretrained.resolve(args.checkpoint)
        tokenizer = pretrained.load_tokenizer(model_dir, args.tokenizer)
        model = pretrained.load_model(model_dir)
        check_tokenizer(model.config, tokenizer)
        args.max_windows = args.max_windows or model.config.max_windows
        if args.max_windows > model.config.max_windows:
            raise ValueError(f"--max-windows {args.max_windows} exceeds what this model takes "
                             f"({model.config.max_windows} windows = {model.config.max_windows * 10} s)")
        out = open_output(args.output)
    except (RequestError, TokenizerError, ConversionError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def emit(item, result: dict) -> None:
        row = {"id": item.id, "audio": item.audio, "prompt": item.prompt, **result}
        if out is not None:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif "answer" in row:
            print(row["answer"] if len(items) == 1 else f"[{item.id}] {row['answer']}", flush=True)

    failed = 0
    loaded: list[tuple[int, Request]] = []
    show = args.progress and len(items) > 1
    try:
        for index, item in enumerate(tqdm(items, desc="reading audio", disable=not show, unit="file")):
            try:
                check_prompt(tokenizer, item.prompt, DEFAULT_MAX_LEN)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    windows = load_windows(item.audio, args.max_windows)
                for w in caught:
                    print(f"warning: {w.message}", file=sys.stderr)
                loaded.append((index, Request(windows, item.prompt)))
            except (AudioError, OSError, ValueError) as e:
                print(f"error: item {item.id}: {e}", file=sys.stderr)
                emit(item, {"error": str(e)})
                failed += 1

        # Batches of similar length waste the least compute on padded windows; answers are written as each batch
        # finishes (so in that order: rows carry their id).
        loaded.sort(key=lambda pair: len(pair[1].windows))
        key = jax.random.key(args.seed)
        batches = [loaded[i:i + args.batch_size] for i in range(0, len(loaded), args.batch_size)]
        with tqdm(total=len(loaded), desc="answering", disable=not show, unit="item") as bar:
            for number, batch in enumerate(batches):
                answers = answer_batch(model, tokenizer, [r for _, r in batch], sampling,
                                       key=jax.random.fold_in(key, number))
                for (index, _), answer in zip(batch, answers):
                    emit(items[index], {"answer": answer})
                bar.update(len(batch))
    finally:
        if out is not None:
            out.close()
    if failed:
        print(f"{failed} of {len(items)} item(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
