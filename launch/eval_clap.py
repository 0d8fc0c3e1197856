"""Evaluate an AF-CLAP model: audio<->text retrieval (recall at 1, 5, 10), zero-shot counting and the composition
test (is a clip closer to its caption than to the same words in swapped order?).

    python launch/eval_clap.py --checkpoint runs/tiny/clap --synthetic-split test --num-examples 200
    python launch/eval_clap.py --checkpoint runs/af-clap --manifest captions.jsonl --output clap_results.json

--checkpoint is an AF-CLAP model in our format (launch/convert.py afclap-from-torch, or a configs/clap.py training
workdir). A manifest is a caption manifest (af2_jax/data/caption_manifests.py: JSONL/JSON with audio + captions,
optionally 'negatives'; CompA's 'pos;neg' strings with --compa). Metrics: af2_jax/evaluation/clap_eval.py.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="AF-CLAP model directory or training workdir")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--manifest", help="caption manifest (JSONL / JSON) of audio paths and captions")
    data.add_argument("--synthetic-split", choices=("train", "test"), help="the embedded synthetic captions")
    p.add_argument("--num-examples", type=int, default=200, help="synthetic clips (default 200)")
    p.add_argument("--captions-per-clip", type=int, default=2, help="synthetic paraphrases per clip")
    p.add_argument("--seed", type=int, default=0, help="synthetic dataset seed (training uses 0)")
    p.add_argument("--audio-root", default=None, help="manifest: directory the audio paths are relative to")
    p.add_argument("--compa", action="store_true", help="manifest captions are CompA 'pos;neg1;neg2' strings")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output", default=None, help="results JSON (default: print only)")
    p.add_argument("--no-progress", action="store_true")
    return p


def load_records(args) -> list[dict]:
    if args.manifest:
        from af2_jax.data.caption_manifests import read_caption_manifest

        return read_caption_manifest(args.manifest, audio_root=args.audio_root,
                                     caption_format="compa" if args.compa else "plain")
    from af2_jax.data.captions import SyntheticCaptionSource

    source = SyntheticCaptionSource(args.synthetic_split, args.num_examples, seed=args.seed,
                                    num_positives=args.captions_per_clip, num_negatives=0)
    return [source[i] for i in range(len(source))]


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_examples", "captions_per_clip", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    import af2_jax  # noqa: F401  (package-wide flax settings)
    from af2_jax import pretrained
    from af2_jax.clap_tokenizer import ClapTokenizerError
    from af2_jax.evaluation import clap_eval

    try:
        model_dir = pretrained.resolve(args.checkpoint)
        if pretrained.read_config(model_dir)[0] != "afclap":
            raise ValueError(f"{model_dir}: not an AF-CLAP model (launch/eval.py evaluates AF2 models)")
        if args.output and not pathlib.Path(args.output).absolute().parent.is_dir():
            raise FileNotFoundError(f"--output {args.output}: its directory does not exist")
        records = load_records(args)
        model, tokenizer = pretrained.load_model(model_dir), pretrained.load_tokenizer(model_dir)
    except (FileNotFoundError, ValueError, ClapTokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    results = clap_eval.evaluate(model, tokenizer, records, batch_size=args.batch_size,
                                 progress=not args.no_progress)
    print(clap_eval.format_results(results))
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps({"checkpoint": str(model_dir), **results}, indent=1) + "\n")
        print(f"results: {args.output}")
    return results


if __name__ == "__main__":
    main()
