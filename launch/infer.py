"""Ask AF2 about audio files.

    python launch/infer.py --checkpoint runs/s3 --audio clip.wav --prompt "what is the dog doing?"
    python launch/infer.py --checkpoint runs/s3 --audio a.wav --prompt "..." --audio b.flac --prompt "..."
    python launch/infer.py --checkpoint runs/s3 --manifest questions.jsonl --output answers.jsonl --batch-size 8
    python launch/infer.py --checkpoint runs/icl --audio a.wav --audio b.wav --prompt "<audio>a dog. <audio>and?"
    python launch/infer.py --checkpoint runs/icl --audio q.wav --prompt "what is it?" --shots 4 --index runs/index
    python launch/infer.py --checkpoint runs/cot --audio clip.wav --prompt "why is it loud?" --cot

The checkpoint is a model in our pretrained format (config.json + params/ + tokenizer/), or a training workdir
(its final/ model). Prompts use the reference format
(`<audio>{question lowercased}<SEP>`); greedy by default (the reference's benchmark setting), or sampling with
--temperature/--top-k/--top-p/--seed. Up to --max-windows 10 s windows (default 30 = 5 min) are read per file;
longer audio is cropped with a warning. A file that cannot be read is reported by name and skipped; the exit code
is nonzero at the end if any item failed.

Several audios per prompt (docs/ICL.md): every --audio given before a --prompt belongs to it, and a prompt with
several clips names one `<audio>` per clip where it belongs (a manifest row gives a list of paths). --shots K
--index DIR prepends the K training examples nearest to each query clip (an index from launch/build_index.py; the
query's own file excluded) in Audio Flamingo 1's few-shot format; --shot-selection random draws them at random
instead. --cot asks in the AF2-SoundCoT format (the tag instruction appended, 1024-token prompts and answers) and
asks once more if the answer lacks its </CONCLUSION>.
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

    p = argparse.ArgumentParser(prog="infer.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="an AF2 model directory (ours: config.json + params/ + tokenizer/), or a training workdir")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's tokenizer/)")
    p.add_argument("--audio", action=_Ordered, default=[],
                   help="audio file; every --audio before a --prompt belongs to it (repeat for several clips)")
    p.add_argument("--prompt", action=_Ordered, default=[],
                   help="question about the --audio file(s) before it (one <audio> per clip when several)")
    p.add_argument("--manifest", default=None, help="JSON/JSONL of {audio, prompt} objects (or an AF2 manifest)")
    p.add_argument("--output", default=None, help="write JSONL {id, audio, prompt, answer | error} here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=None,
                   help="10 s windows read per file (default: all the model takes, 30 = 5 min for AF2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (--cot: 1024)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", type=int, default=0,
                   help="K: prepend K retrieved few-shot examples to each (single-clip) question; needs --index")
    p.add_argument("--index", default=None, help="retrieval index directory (launch/build_index.py)")
    p.add_argument("--shot-selection", choices=("similar", "random"), default="similar",
                   help="similar: the K nearest clips (AF1's knn); random: K random index entries")
    p.add_argument("--retrieval-model", default=None,
                   help="the model that embeds the queries (default: the one that built the index)")
    p.add_argument("--cot", action="store_true",
                   help="AF2-SoundCoT prompt: tag instruction appended, 1024-token prompt and answer limits")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_serving_arguments(p)
    return p


class _Ordered(argparse.Action):
    """Keeps --audio and --prompt in command-line order, so each prompt takes the audio files given before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        getattr(namespace, self.dest).append(values)
        if not hasattr(namespace, "ordered") or namespace.ordered is None:
            namespace.ordered = []
        namespace.ordered.append((self.dest, values))


def _items(args, parser):
    from af2_jax.inference.requests import Item, read_items

    if args.manifest and (args.audio or args.prompt):
        parser.error("give either --manifest or --audio/--prompt pairs, not both")
    if args.manifest:
        return read_items(args.manifest)
    if not args.audio or not args.prompt:
        parser.error(f"--audio and --prompt must come in pairs (got {len(args.audio)} and {len(args.prompt)})")
    items, pending = [], []
    for kind, value in getattr(args, "ordered", None) or []:
        if kind == "audio":
            pending.append(value)
            continue
        if not pending:
            parser.error(f"--prompt {value[:40]!r} has no --audio before it (give each prompt its audio file(s) "
                         f"first)")
        items.append(Item(str(len(items)), pending if len(pending) > 1 else pending[0], value))
        pending = []
    if pending:
        parser.error(f"--audio {pending[-1]} has no --prompt after it (--audio and --prompt must come in pairs)")
    return items


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
    if args.shots < 0 or (args.shots and not args.index):
        parser.error("--shots K needs K >= 0 and an --index DIR to retrieve the examples from")
    if args.index and not args.shots:
        parser.error("--index is used with --shots K (K >= 1)")

    import jax
    from tqdm import tqdm

    from af2_jax.audio.io import AudioError, load_audio
    from af2_jax.inference.requests import (RequestError, answer_prompts, fewshot_request, load_answering_model,
                                            load_windows, text_prompt_ids)
    from af2_jax.inference.sampling import SamplingConfig
    from af2_jax.inference.serving import serving_options
    from af2_jax.param_tree import ConversionError
    from af2_jax.retrieval.index import IndexFileError
    from af2_jax.tokenizer import (AUDIO_TOKEN, COT_MAX_LEN, DEFAULT_MAX_LEN, SEP_TOKEN, TokenizerError, check_prompt,
                                   cot_prompt, encode_prompt)

    max_prompt = COT_MAX_LEN if args.cot else DEFAULT_MAX_LEN
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (COT_MAX_LEN if args.cot else 256)
    out = None
    index = embedder = None
    try:
        items = _items(args, parser)
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  max_new_tokens=max_new, seed=args.seed)
        model, tokenizer, args.max_windows = load_answering_model(
            args.checkpoint, args.tokenizer, args.max_windows, serving_options(args))
        if args.shots:
            from af2_jax.retrieval import embed, index as index_lib

            index = index_lib.load_index(args.index)
            embedder = embed.load_embedder(args.retrieval_model or index.model)
            if embedder.embedding != index.embedding:
                raise ValueError(f"--index {args.index} holds {index.embedding} embeddings; "
                                 f"{embedder.model_dir} makes {embedder.embedding} ones")
        out = open_output(args.output)
    except (RequestError, TokenizerError, ConversionError, IndexFileError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def emit(item, result: dict) -> None:
        row = {"id": item.id, "audio": item.audio, "prompt": item.prompt, **result}
        if out is not None:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif "answer" in row:
            print(row["answer"] if len(items) == 1 else f"[{item.id}] {row['answer']}", flush=True)

    def prepare(number: int, item) -> tuple[list, list[int], dict]:
        """(clips, prompt ids, extra output fields) of one item; raises with a message naming the problem."""
        prompt = cot_prompt(item.prompt) if args.cot else item.prompt
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clips = [load_windows(path, args.max_windows) for path in item.audios]
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        if args.shots:
            if len(clips) != 1:
                raise ValueError(f"--shots retrieves examples for one query clip; this item has {len(clips)}")
            wave = load_audio(item.audios[0], duration=10.0)  # the index embeds each clip's first 10 s too
            clips, text, shots = fewshot_request(index, embedder, clips[0], wave, prompt, args.shots,
                                                 max_windows=args.max_windows, seed=args.seed,
                                                 query_number=number, query_file=item.audios[0],
                                                 selection=args.shot_selection)
            if len(shots) < args.shots:
                print(f"warning: item {item.id}: only {len(shots)} examples found in the index", file=sys.stderr)
            ids = text_prompt_ids(tokenizer, text, audios=len(clips), max_prompt_tokens=max_prompt)
            return clips, ids, {"shots": [s.get("id") for s in shots]}
        if len(clips) == 1:  # the reference format, exactly as a single-audio prompt always was
            check_prompt(tokenizer, prompt, max_prompt)
            return clips, encode_prompt(tokenizer, prompt, max_prompt), {}
        if SEP_TOKEN in prompt:
            raise ValueError(f"the prompt must not hold {SEP_TOKEN} (it is appended)")
        try:
            ids = text_prompt_ids(tokenizer, prompt.lower().strip() + SEP_TOKEN, audios=len(clips),
                                  max_prompt_tokens=max_prompt)
        except ValueError as e:
            raise ValueError(f"{e}: with {len(clips)} audio files, write one {AUDIO_TOKEN} per clip in the prompt "
                             f"where it belongs (or pair each --audio with its own --prompt)") from None
        return clips, ids, {}

    failed = 0
    loaded: list[tuple[int, list, list[int], dict]] = []
    show = args.progress and len(items) > 1
    if any(len(i.audios) > 1 for i in items) and not model.config.media_location_mask and not args.shots:
        print("note: this model has no media-location mask: every text token sees every clip", file=sys.stderr)
    try:
        for number, item in enumerate(tqdm(items, desc="reading audio", disable=not show, unit="item")):
            try:
                clips, ids, extra = prepare(number, item)
                loaded.append((number, clips, ids, extra))
            except (AudioError, OSError, ValueError) as e:
                print(f"error: item {item.id}: {e}", file=sys.stderr)
                emit(item, {"error": str(e)})
                failed += 1

        # Batches of one layout and similar length waste the least compute on padding; answers are written as
        # each batch finishes (so in that order: rows carry their id).
        loaded.sort(key=lambda row: (len(row[1]), max(len(c) for c in row[1])))
        key = jax.random.key(args.seed)
        batches = [loaded[i:i + args.batch_size] for i in range(0, len(loaded), args.batch_size)]
        with tqdm(total=len(loaded), desc="answering", disable=not show, unit="item") as bar:
            for number, batch in enumerate(batches):
                answers = answer_prompts(model, tokenizer, [row[1] for row in batch], [row[2] for row in batch],
                                         sampling, key=jax.random.fold_in(key, number))
                if args.cot:  # the reference asks once more when the answer has no conclusion
                    again = [k for k, a in enumerate(answers) if "</conclusion>" not in a.lower()]
                    if again:
                        retry = answer_prompts(model, tokenizer, [batch[k][1] for k in again],
                                               [batch[k][2] for k in again], sampling,
                                               key=jax.random.fold_in(key, len(batches) + number))
                        for k, answer in zip(again, retry):
                            answers[k] = answer
                for (index_, _, _, extra), answer in zip(batch, answers):
                    emit(items[index_], {"answer": answer, **extra})
                bar.update(len(batch))
    finally:
        if out is not None:
            out.close()
    if failed:
        print(f"{failed} of {len(items)} item(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
