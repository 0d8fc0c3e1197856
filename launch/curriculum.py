"""The whole AF2 recipe in one command: AF-CLAP pretraining, then curriculum stage 1 -> 2 -> 3, each starting from
the one before, with evaluation along the way.

    python launch/curriculum.py --preset tiny --workdir runs/tiny
    python launch/curriculum.py --preset tiny --workdir runs/quick --stage1-steps 50 \
        --stage2-steps 50 --stage3-steps 20 --set 3:max_windows=6
    python launch/curriculum.py --preset tiny --workdir runs/tiny-clap --clap --set 1:model.calibrate_feature_norm=0

With --clap, a tiny AF-CLAP is first pretrained on the synthetic captions (configs/clap.py, in <workdir>/clap), as
the real recipe starts from AF-CLAP: stage 1 takes its audio half (`init_from=htsat=<workdir>/clap`). Without it
(the default) stage 1 starts from a random, calibrated HTSAT (real presets start from converted weights); the tiny
AF-CLAP does not improve the tiny curriculum yet (docs/RESULTS.md section 5). Each stage trains in
<workdir>/stageN (configs/stageN.py:PRESET, what launch/train.py runs) with init_from set to the previous stage's
workdir. AF-CLAP is evaluated on the synthetic caption test split (retrieval, composition: eval_clap.json); after
stages 2 and 3 the model answers the synthetic test split of the skills that stage trained (eval_stageN.json), the
per-skill accuracy printed next to chance. The loss curves go to training_curves.png and a summary to
results.json. Re-running the same command resumes where it stopped (a finished stage is not trained again); delete
a stage's folder to retrain it.
"""
from __future__ import annotations

import argparse
import ast
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = (0, 1, 2, 3)  # 0: AF-CLAP pretraining
CLAP = 0
EVALUATED_STAGES = (0, 2, 3)
PLOT_FILE = "training_curves.png"
RESULTS_FILE = "results.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model/recipe preset of configs/stageN.py (tiny, 0.5b, ...)")
    p.add_argument("--workdir", required=True, help="run folder: clap/, stage1/, stage2/, stage3/, results, plot")
    p.add_argument("--seed", type=int, default=None, help="every stage's seed: initialisation, data order, dropout "
                                                          "(default: the configs', 0)")
    p.add_argument("--clap", action=argparse.BooleanOptionalAction, default=None,
                   help="pretrain AF-CLAP first and start stage 1 from its HTSAT (default: off; the tiny AF-CLAP "
                        "does not help the tiny curriculum yet, docs/RESULTS.md section 5)")
    p.add_argument("--clap-steps", type=int, default=None, help="AF-CLAP pretraining steps (default: config)")
    for stage in STAGES[1:]:
        p.add_argument(f"--stage{stage}-steps", type=int, default=None, help=f"stage {stage} steps (default: config)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                   help="override a config field of one stage (clap, 1, 2, 3 or all), e.g. 3:max_windows=6; "
                        "repeatable")
    p.add_argument("--eval-examples-per-skill", type=int, default=50,
                   help="short-audio test examples per skill (one window each: cheap)")
    p.add_argument("--eval-long-examples-per-skill", type=int, default=40,
                   help="long-audio test examples per skill (5 min: each costs 30 HTSAT windows)")
    p.add_argument("--eval-clap-examples", type=int, default=200, help="AF-CLAP test clips (two captions each)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24, help="the synthetic answers are a few tokens long")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent JAX compilation cache (default: <workdir>/jax_cache; '' to disable). Compiling "
                        "dominates a tiny run, and a resumed or repeated run finds its programs there")
    p.add_argument("--cpu-devices", type=int, default=min(2, os.cpu_count() or 1),
                   help="XLA host devices on a CPU-only machine (default: 2, or 1 on one core). XLA runs each CPU op "
                        "on one core; with N devices the data-parallel mesh uses N cores. N must divide every stage's "
                        "batch size. No effect on GPU/TPU, nor when XLA_FLAGS already sets a host device count")
    p.add_argument("--no-eval", action="store_true", help="train and plot only")
    p.add_argument("--no-progress", action="store_true", help="no evaluation progress bar")
    return p


def parse_overrides(entries) -> dict[int, list[tuple[str, object]]]:
    """["3:max_windows=6", "all:seed=1"] -> {stage: [(dotted key, value)]}; values are Python literals or text."""
    overrides: dict[int, list] = {s: [] for s in STAGES}
    for entry in entries:
        where, sep, assignment = entry.partition(":")
        key, eq, text = assignment.partition("=")
        if not sep or not eq or not key or where not in ("all", "clap", *map(str, STAGES[1:])):
            raise SystemExit(f"error: --set {entry!r}: expected STAGE:KEY=VALUE with STAGE in clap, 1, 2, 3 or all")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string such as a path
        for stage in STAGES if where == "all" else ((CLAP,) if where == "clap" else (int(where),)):
            overrides[stage].append((key.strip(), value))
    return overrides


def set_field(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for name in parents:
        node = node.get(name) if hasattr(node, "get") else None
    if node is None or not hasattr(node, "keys") or leaf not in node:
        raise SystemExit(f"error: --set: the stage config has no field {dotted!r}")
    try:
        setattr(node, leaf, value)
    except (TypeError, ValueError) as e:  # ml_collections refuses a value of another type
        raise SystemExit(f"error: --set {dotted}={value!r}: {e}") from None


def uses_clap(args) -> bool:
    return bool(args.clap)


def stage_config(args, stage: int, overrides) -> object:
    from af2_jax.training.run_config import load_stage_config

    try:  # real presets pretrain the large AF-CLAP (if asked to: they normally start from NVIDIA's)
        cfg = load_stage_config(stage, args.preset if stage != CLAP or args.preset == "tiny" else "large")
    except ValueError as e:  # an unknown preset
        raise SystemExit(f"error: --preset: {e}") from None
    if stage > 1:  # the curriculum's point: start from what the previous stage learnt
        cfg.init_from = str(stage_dir(args.workdir, stage - 1))
    elif stage == 1 and uses_clap(args):  # as the real recipe starts from AF-CLAP: its audio half
        cfg.init_from = f"htsat={stage_dir(args.workdir, CLAP)}"
    steps = args.clap_steps if stage == CLAP else getattr(args, f"stage{stage}_steps")
    if steps is not None:
        cfg.num_steps = steps
    if args.seed is not None:
        cfg.seed = args.seed
    for key, value in overrides[stage]:
        set_field(cfg, key, value)
    return cfg


def stage_dir(workdir, stage: int) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / ("clap" if stage == CLAP else f"stage{stage}")


def stage_name(stage: int) -> str:
    return "AF-CLAP pretraining" if stage == CLAP else f"stage {stage}"


def evaluate_stage(args, stage: int, cfg) -> dict:
    """Greedy answers of the stage's final model on the synthetic test split of the skills the stage trained."""
    from af2_jax import pretrained
    from af2_jax.data.config import default_synthetic_config
    from af2_jax.data.synthetic import LONG_SKILLS, SyntheticSource
    from af2_jax.evaluation import report, runner
    from af2_jax.inference.sampling import SamplingConfig

    parts = []
    for source in default_synthetic_config("test", stage=stage)["sources"]:
        skills = tuple(source["skills"])
        per_skill = (args.eval_long_examples_per_skill if set(skills) <= set(LONG_SKILLS)
                     else args.eval_examples_per_skill)
        parts.append(SyntheticSource("test", per_skill * len(skills), seed=source["seed"],
                                     skills=skills, mcq_probability=source["mcq_probability"]))
    records = runner.Concatenated(parts)
    model_dir = pretrained.resolve(stage_dir(args.workdir, stage))
    model = pretrained.load_model(model_dir)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    settings = runner.EvalSettings(batch_size=args.eval_batch_size, max_windows=cfg.max_windows)
    metadata = {"checkpoint": str(model_dir), "stage": stage,
                "data": {"source": "synthetic", "split": "test", "num_examples": len(records),
                         "parts": [{"skills": list(p.skills), "seed": p.seed, "num_examples": len(p),
                                    "mcq_probability": p.mcq_probability} for p in parts]},
                "sampling": {"temperature": 0.0, "max_new_tokens": sampling.max_new_tokens}}
    payload = runner.evaluate(runner.model_generate_fn(model, pretrained.load_tokenizer(model_dir), sampling), records,
                              settings, progress=not args.no_progress, metadata=metadata)
    report.write_json(pathlib.Path(args.workdir) / f"eval_stage{stage}.json", payload)
    print(f"\nstage {stage} evaluation ({len(records)} synthetic test examples):")
    print(report.format_table(payload["tasks"], payload["overall"]))
    return payload


def evaluate_clap(args) -> dict:
    """AF-CLAP's retrieval, zero-shot counting and composition test on the synthetic caption test split."""
    from af2_jax import pretrained
    from af2_jax.data.captions import SyntheticCaptionSource
    from af2_jax.evaluation import clap_eval, report

    model_dir = pretrained.resolve(stage_dir(args.workdir, CLAP))
    source = SyntheticCaptionSource("test", args.eval_clap_examples, seed=0, num_positives=2, num_negatives=0)
    results = clap_eval.evaluate(pretrained.load_model(model_dir), pretrained.load_tokenizer(model_dir),
                                 [source[i] for i in range(len(source))], progress=not args.no_progress)
    report.write_json(pathlib.Path(args.workdir) / "eval_clap.json", {"checkpoint": str(model_dir), **results})
    print(f"\nAF-CLAP evaluation ({results['clips']} synthetic test clips, {results['captions']} captions):")
    print(clap_eval.format_results(results))
    return results


def use_cpu_devices(count: int) -> None:
    """Split the CPU into `count` XLA host devices (before JAX starts): the train step's batch is sharded over them,
    so each core runs its share of the rows (docs/PERFORMANCE.md: 1.4x per HTSAT call on 2 cores)."""
    if count < 1:
        raise SystemExit(f"--cpu-devices must be >= 1, got {count}")
    flags = os.environ.get("XLA_FLAGS", "")
    if count > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def use_compilation_cache(directory) -> None:
    """Keep compiled programs on disk, unless the user's JAX configuration already names a cache."""
    import jax

    if not directory or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def comparison_table(evaluations: dict[int, dict]) -> str:
    """Per skill: chance level, then accuracy after each evaluated stage ('-' where a stage did not test it)."""
    skills = sorted({task for payload in evaluations.values() for task in payload["tasks"]})
    header = ["skill", "chance %"] + [f"after stage {s} %" for s in evaluations]
    rows = []
    for skill in skills:
        tested = [p["tasks"].get(skill) for p in evaluations.values()]
        chance = next((t["chance"] for t in tested if t and t["chance"] is not None), None)
        cells = [skill, "-" if chance is None else f"{100 * chance:.1f}"]
        cells += ["-" if not t or t["accuracy"] is None else f"{100 * t['accuracy']:.1f}" for t in tested]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "-" * len(fmt(header)), *map(fmt, rows)])


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    use_cpu_devices(args.cpu_devices)
    import logging

    from absl import logging as absl_logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the train loop's progress lines
    absl_logging.set_verbosity(absl_logging.WARNING)  # not Orbax's per-save chatter
    from af2_jax.evaluation import curves, report
    from af2_jax.training import loop
    from af2_jax.training.metrics import METRICS_FILE

    from af2_jax.training.run_config import ConfigError, validate

    workdir = pathlib.Path(args.workdir).absolute()
    overrides = parse_overrides(args.set)
    stages = STAGES if uses_clap(args) else STAGES[1:]
    configs = {}
    for stage in stages:  # every stage's config is checked before anything is created
        configs[stage] = stage_config(args, stage, overrides)
        try:
            validate(configs[stage])
        except ConfigError as e:
            raise SystemExit(f"error: {stage_name(stage)}: {e}") from None
    workdir.mkdir(parents=True, exist_ok=True)
    use_compilation_cache(workdir / "jax_cache" if args.compilation_cache is None else args.compilation_cache)
    summary = {"preset": args.preset, "workdir": str(workdir), "stages": {}, "evaluations": {}}
    evaluations: dict[int, dict] = {}
    for stage in stages:
        cfg = configs[stage]
        windows = "" if stage == CLAP else f", {cfg.max_windows} windows"
        print(f"\n=== {stage_name(stage)}: {cfg.num_steps} steps{windows}, seed {cfg.seed}, "
              f"init_from={cfg.init_from or '(random / config)'} -> {stage_dir(workdir, stage)}", flush=True)
        started = time.perf_counter()
        result = loop.train(cfg, stage_dir(workdir, stage))
        if result.status != "finished":
            print(f"{stage_name(stage)} {result.status} at step {result.last_step}; re-run the same command to "
                  f"resume")
            raise SystemExit(1)
        key = "clap" if stage == CLAP else str(stage)
        summary["stages"][key] = {"workdir": str(stage_dir(workdir, stage)), "num_steps": cfg.num_steps,
                                  "init_from": cfg.init_from, "seed": cfg.seed,
                                  "train_minutes": round((time.perf_counter() - started) / 60, 2)}
        if stage in EVALUATED_STAGES and not args.no_eval:
            started = time.perf_counter()
            if stage == CLAP:
                summary["evaluations"]["clap"] = evaluate_clap(args)
            else:
                evaluations[stage] = evaluate_stage(args, stage, cfg)
                summary["evaluations"][key] = {"file": str(workdir / f"eval_stage{stage}.json"),
                                               "tasks": evaluations[stage]["tasks"],
                                               "overall": evaluations[stage]["overall"]}
            summary["stages"][key]["eval_minutes"] = round((time.perf_counter() - started) / 60, 2)

    stage_metrics = {stage_name(s): curves.read_metrics(stage_dir(workdir, s) / METRICS_FILE) for s in stages
                     if (stage_dir(workdir, s) / METRICS_FILE).is_file()}
    plot = curves.plot_training_curves(stage_metrics, workdir / PLOT_FILE, title=f"AF2 {args.preset} curriculum")
    summary["plot"] = str(plot)
    summary["final_loss"] = {name: records[-1]["loss"] for name, records in stage_metrics.items() if records}
    report.write_json(workdir / RESULTS_FILE, summary)
    if evaluations:
        print("\nper-skill accuracy on the synthetic test split:")
        print(comparison_table(evaluations))
    print(f"\ntraining curves: {plot}\nsummary: {workdir / RESULTS_FILE}")
    return summary


if __name__ == "__main__":
    main()
