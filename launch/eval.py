"""Evaluate a model on a test set: per-task accuracy next to chance, exact match, token F1, CIDEr-D for captions.

    python launch/eval.py --checkpoint runs/tiny/stage3 --synthetic-split test --num-examples 140
    python launch/eval.py --checkpoint <model dir> --manifest test.json --max-windows 30 --output results.json

--checkpoint is a model in our pretrained format or a training workdir (its final/). Decoding is greedy unless
--temperature > 0 (the reference's benchmarks use T=0). The JSON file holds every prediction, so the metrics can
be recomputed from it (af2_jax/evaluation/report.py describes the schema).
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SKILL_SETS = ("short", "long", "all")


def build_parser() -> argparse.ArgumentParser:
    from af2_jax.inference.serving import add_serving_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="pretrained-format model directory, or a training workdir")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--manifest", help="test manifest: AF2 dataset JSON, or JSONL of audio/prompt/answer rows")
    data.add_argument("--synthetic-split", choices=("train", "test"), help="the embedded synthetic dataset's split")
    p.add_argument("--num-examples", type=int, default=None,
                   help="evaluate the first N examples (synthetic default: 20 per skill)")
    p.add_argument("--skills", default="short",
                   help="synthetic skills: short | long | all | a comma-separated list (default: short)")
    p.add_argument("--seed", type=int, default=0, help="synthetic dataset seed (the training runs use 0)")
    p.add_argument("--mcq-probability", type=float, default=None,
                   help="synthetic: share of questions asked MMAU-style with lettered options (default: the "
                        "generator's 0.3; the tiny curriculum trains and tests with 0)")
    p.add_argument("--audio-root", default=None, help="manifest: directory the audio paths are relative to")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: beside the model, else the "
                                                     "training run's, else the synthetic tokenizer)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=None, help="10 s windows per clip (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sampling-seed", type=int, default=0)
    p.add_argument("--output", default=None,
                   help="results JSON (default: eval_<model>_<data>.json in the current directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_serving_arguments(p)
    return p


def synthetic_skills(spec: str) -> tuple[str, ...]:
    from af2_jax.data import synthetic

    named = {"short": synthetic.SHORT_SKILLS, "long": synthetic.LONG_SKILLS, "all": synthetic.ALL_SKILLS}
    return named.get(spec) or tuple(s.strip() for s in spec.split(",") if s.strip())


def load_test_set(args):
    """(records, description) of the chosen test set."""
    if args.manifest:
        from af2_jax.data.manifests import read_manifest

        records = read_manifest(args.manifest, audio_root=args.audio_root)
        if args.num_examples is not None:
            records = records[: args.num_examples]
        return records, {"source": "manifest", "path": os.path.abspath(args.manifest)}
    from af2_jax.data.synthetic import MCQ_PROBABILITY, SyntheticSource

    skills = synthetic_skills(args.skills)
    count = args.num_examples if args.num_examples is not None else 20 * len(skills)
    mcq = MCQ_PROBABILITY if args.mcq_probability is None else args.mcq_probability
    source = SyntheticSource(args.synthetic_split, count, seed=args.seed, skills=skills, mcq_probability=mcq)
    return source, {"source": "synthetic", "split": args.synthetic_split, "seed": args.seed, "skills": list(skills),
                    "mcq_probability": mcq}


class UsageError(Exception):
    """A bad model, tokenizer, test set or output path, found before any answer is generated."""


def prepare(args):
    """(model, tokenizer, records, data description, output path): everything that can fail before generating."""
    from af2_jax import pretrained
    from af2_jax.inference import serving
    from af2_jax.inference.requests import RequestError
    from af2_jax.param_tree import ConversionError
    from af2_jax.tokenizer import TokenizerError

    try:
        model_dir = pretrained.resolve(args.checkpoint)
        model_name = model_dir.parent.name if model_dir.name == pretrained.FINAL_DIR else model_dir.name
        output = pathlib.Path(args.output or f"eval_{model_name}_{data_name(args)}.json")
        if not output.absolute().parent.is_dir():
            raise FileNotFoundError(f"--output {output}: the directory {output.absolute().parent} does not exist")
        records, data = load_test_set(args)
        tokenizer = pretrained.load_tokenizer(model_dir, args.tokenizer)
        model = serving.load_serving_model(model_dir, serving.serving_options(args))
        if args.max_windows and args.max_windows > model.config.max_windows:
            raise ValueError(f"--max-windows {args.max_windows} exceeds what this model takes "
                             f"({model.config.max_windows} windows)")
    except (FileNotFoundError, NotADirectoryError, RequestError, TokenizerError, ConversionError, ValueError) as e:
        raise UsageError(str(e)) from None
    return model_dir, model, tokenizer, records, data, output


def run(args) -> dict:
    """Load, generate, score, print the table, write the JSON; returns the results payload."""
    from af2_jax.evaluation import report, runner
    from af2_jax.inference.sampling import SamplingConfig

    model_dir, model, tokenizer, records, data, output = prepare(args)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.sampling_seed)
    settings = runner.EvalSettings(batch_size=args.batch_size,
                                   max_windows=args.max_windows or model.config.max_windows)
    metadata = {"checkpoint": str(model_dir), "data": {**data, "num_examples": len(records)},
                "serving": {"dtype": args.dtype, "quantize": args.quantize, "fsdp": args.fsdp, "tensor": args.tensor},
                "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                             "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed}}
    try:
        payload = runner.evaluate(runner.model_generate_fn(model, tokenizer, sampling), records, settings,
                                  progress=not args.no_progress, metadata=metadata)
    except runner.NothingToEvaluate as e:
        raise UsageError(str(e)) from None
    print(report.format_table(payload["tasks"], payload["overall"]))
    if payload["skipped"]:
        print(f"{len(payload['skipped'])} of {len(records)} records skipped (unreadable audio; listed in the JSON); "
              f"the metrics are over the other {len(payload['predictions'])}")
    report.write_json(output, payload)
    print(f"results: {output}")
    return payload


def data_name(args) -> str:
    if args.manifest:
        return os.path.splitext(os.path.basename(args.manifest))[0]
    return f"synthetic_{args.synthetic_split}"


def check_args(parser, args) -> None:
    for name in ("batch_size", "max_new_tokens", "num_examples", "max_windows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.synthetic_split:
        from af2_jax.data import synthetic

        unknown = [s for s in synthetic_skills(args.skills) if s not in synthetic.ALL_SKILLS]
        if unknown:
            parser.error(f"--skills: unknown skills {unknown}; choose from {', '.join(synthetic.ALL_SKILLS)} or "
                         f"{'/'.join(SKILL_SETS)}")


def main(argv=None) -> dict:
    """Returns the results payload; a bad argument, model or test set is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
