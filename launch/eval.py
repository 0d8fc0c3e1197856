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
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SKILL_SETS = ("short", "long", "all")


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--output", default=None, help="results JSON (default: <checkpoint>/eval_<data>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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


def run(args) -> dict:
    """Load, generate, score, print the table, write the JSON; returns the results payload."""
    from af2_jax import pretrained
    from af2_jax.evaluation import report, runner
    from af2_jax.inference.sampling import SamplingConfig

    model_dir = runner.model_directory(args.checkpoint)
    records, data = load_test_set(args)
    model = pretrained.load_model(model_dir)
    tokenizer = runner.load_tokenizer(model_dir, args.tokenizer)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.sampling_seed)
    settings = runner.EvalSettings(batch_size=args.batch_size,
                                   max_windows=args.max_windows or model.config.max_windows)
    metadata = {"checkpoint": str(model_dir), "data": {**data, "num_examples": len(records)},
                "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                             "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed}}
    payload = runner.evaluate(runner.model_generate_fn(model, tokenizer, sampling), records, settings,
                              progress=not args.no_progress, metadata=metadata)
    print(report.format_table(payload["tasks"], payload["overall"]))
    name = data.get("split") or os.path.splitext(os.path.basename(data.get("path", "manifest")))[0]
    output = args.output or os.path.join(model_dir, f"eval_{name}.json")
    report.write_json(output, payload)
    print(f"results: {output}")
    return payload


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
