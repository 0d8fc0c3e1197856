"""Audio Flamingo 1's abilities on our tiny AF2, end to end on a CPU: in-context learning, retrieval-augmented
few-shot prompts and a multi-turn chat (docs/ICL.md, docs/RESULTS.md "In-context learning (issue 17)").

    python launch/icl_demo.py --workdir runs/icl

1. data: WAV clips of five sound classes (train / held-out test split) and of counting clips for the chat skill,
   with JSONL manifests (af2_jax/data/synthetic_icl.py); the demo's tiny tokenizer (every made-up name one token);
2. init: the random tiny AF2 with AF1's media-location mask, HTSAT's output norm calibrated on the clips (what the
   tiny curriculum does at its step 0);
3. index: launch/build_index.py's index of the TRAINING clips, by the init model's HTSAT tokens (mean-pooled);
   HTSAT stays frozen in training, so the trained model embeds the same;
4. episodes: interleaved few-shot training records (half with retrieved examples, half random ones that show the
   query's class at least once), every episode with fresh made-up names; two-round chats;
5. train: configs/icl.py through the usual train loop, Grain pipeline and bucketing;
6. evaluate on the held-out clips: zero-shot vs random 4-shot vs retrieved 4-shot (the same made-up names per
   query in all three), next to chance; and the chat's follow-up question, with and without its history.

Re-running resumes training from its checkpoint; results go to <workdir>/results.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

SHOTS = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icl_demo.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--workdir", default="runs/icl")
    p.add_argument("--train-clips", type=int, default=500, help="class clips in the training split (and index)")
    p.add_argument("--test-clips", type=int, default=150, help="held-out class clips: one test query each")
    p.add_argument("--chat-train", type=int, default=600, help="counting clips (dialogues) for training")
    p.add_argument("--chat-test", type=int, default=100, help="held-out counting dialogues")
    p.add_argument("--episodes", type=int, default=4000, help="few-shot training episodes")
    p.add_argument("--steps", type=int, default=None, help="train steps (default: configs/icl.py's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-devices", type=int, default=2,
                   help="XLA host devices the CPU is split into (the batch is sharded over them)")
    p.add_argument("--eval-batch-size", type=int, default=30)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def use_cpu_devices(count: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if count > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# 1-2. data, tokenizer, the initial model


def write_data(args, data: pathlib.Path) -> None:
    from af2_jax.data import synthetic_icl as icl

    if (data / "chat-test.jsonl").is_file():
        return
    started = time.perf_counter()
    icl.write_class_clips(data / "clips", "train", args.train_clips, seed=args.seed)
    icl.write_class_clips(data / "clips", "test", args.test_clips, seed=args.seed)
    icl.write_chat_clips(data / "clips", "train", args.chat_train, seed=args.seed)
    icl.write_chat_clips(data / "clips", "test", args.chat_test, seed=args.seed)
    tokenizer = icl.icl_tokenizer()
    icl.check_single_token_names(tokenizer)
    tokenizer.save(data / "tokenizer")
    for split in ("train", "test"):  # the manifests the index, training and evaluation read
        os.replace(data / "clips" / f"{split}.jsonl", data / f"{split}.jsonl")
        os.replace(data / "clips" / f"chat-{split}.jsonl", data / f"chat-{split}.jsonl")
    say(f"data: {args.train_clips} + {args.test_clips} class clips, {args.chat_train} + {args.chat_test} counting "
        f"clips in {data} ({time.perf_counter() - started:.0f} s)")


def model_config(cfg, tokenizer):
    """The run's AF2Config with AF1's media-location mask (the loop's model_config has no field for it)."""
    import dataclasses

    from af2_jax.training import initialization

    config = initialization.model_config(cfg.model, max_windows=cfg.max_windows, tokenizer=tokenizer)
    return dataclasses.replace(config, media_location_mask=True)


def write_init_model(cfg, config, tokenizer, data: pathlib.Path, seed: int) -> None:
    """The random model with HTSAT's final norm standardised over the training clips (target 0.3, as the tiny
    curriculum's `model.calibrate_feature_norm`), saved as init/."""
    from flax import nnx

    from af2_jax import pretrained
    from af2_jax.audio.windows import pad_batch
    from af2_jax.data import manifests
    from af2_jax.data.examples import load_waveform
    from af2_jax.audio.windows import make_windows
    from af2_jax.models import htsat_calibration
    from af2_jax.models.af2 import AF2Model

    if pretrained.is_model_dir(data / "init"):
        return
    model = AF2Model(config, rngs=nnx.Rngs(seed))
    records = (manifests.read_jsonl(data / "train.jsonl")[:128] + manifests.read_jsonl(data / "chat-train.jsonl")[:64])
    batches = []
    for start in range(0, len(records), 16):
        windows = [make_windows(load_waveform(r, 1), 1) for r in records[start:start + 16]]
        audio, mask = pad_batch(windows)
        batches.append({"audio": audio, "audio_mask": mask})
    htsat_calibration.standardise_output_norm(model.htsat, batches, target_std=0.3)
    pretrained.save(data / "init", config, model, tokenizer=tokenizer, overwrite=True)
    say(f"init: random tiny AF2 (media-location mask on), HTSAT norm calibrated on {len(records)} clips")


# ---------------------------------------------------------------------------------------------------------------
# 3-4. the index and the training episodes


def build_index(data: pathlib.Path, index_dir: pathlib.Path, progress: bool) -> None:
    from af2_jax.retrieval import index as index_lib

    if (index_dir / index_lib.ENTRIES_FILE).is_file():
        return
    import build_index as command

    started = time.perf_counter()
    count, _ = command.build(str(data / "init"), str(data / "train.jsonl"), str(index_dir), progress=progress)
    say(f"index: {count} training clips by HTSAT pooled tokens -> {index_dir} ({time.perf_counter() - started:.0f} s)")


def write_episodes(args, data: pathlib.Path, index, embeddings) -> None:
    """icl-train.jsonl: episode e queries training clip e mod N with 4 examples, retrieved (even e) or random with
    the query's class among them (odd e); chat-train.jsonl is written with the clips."""
    import numpy as np

    from af2_jax.data import synthetic_icl as icl
    from af2_jax.retrieval import fewshot

    path = data / "icl-train.jsonl"
    if path.is_file():
        return
    entries = index.entries
    n = len(entries)
    queries = [e % n for e in range(args.episodes)]
    similar = [e for e in range(args.episodes) if e % 2 == 0]
    retrieved = fewshot.retrieve_shots(index, embeddings[[queries[e] for e in similar]], SHOTS, seed=args.seed + 1,
                                       query_files=[entries[queries[e]]["audio"] for e in similar],
                                       query_rows=[queries[e] for e in similar], first_query=0)
    shots_of = dict(zip(similar, retrieved))
    with open(path, "w", encoding="utf-8") as f:
        for e in range(args.episodes):
            rng = np.random.default_rng([args.seed, 7, e])
            query = entries[queries[e]]
            if e in shots_of:
                shots, kind = shots_of[e], "similar"
            else:  # random examples; redrawn until the query's class is shown (else its name is unknowable)
                kind = "random"
                while True:
                    shots = fewshot.random_shots(entries, SHOTS, rng, query_file=query["audio"],
                                                 query_row=queries[e])
                    if any(entries[s]["skill"] == query["skill"] for s in shots):
                        break
            record = icl.episode_record(entries, shots, query, icl.episode_names(rng), kind=kind,
                                        record_id=f"episode-{e}")
            f.write(json.dumps(record) + "\n")
    say(f"episodes: {args.episodes} few-shot training records (half retrieved, half random) -> {path}")


# ---------------------------------------------------------------------------------------------------------------
# 5. training


def train(cfg, config, workdir: pathlib.Path):
    from flax import nnx

    from af2_jax import pretrained
    from af2_jax.models.af2 import AF2Model
    from af2_jax.tokenizer import load_tokenizer
    from af2_jax.training import loop

    model_dir = workdir / "model"
    if pretrained.is_model_dir(model_dir):
        return model_dir, None
    started = time.perf_counter()
    result = loop.train(cfg, workdir / "train", make_model=lambda: AF2Model(config, rngs=nnx.Rngs(cfg.seed)))
    if result.status != "finished":
        raise SystemExit(f"training {result.status} at step {result.last_step}; re-run to resume")
    model = result.split.merge(result.state["trainable"], result.state["batch_stats"], result.frozen)
    pretrained.save(model_dir, config, model, tokenizer=load_tokenizer(cfg.tokenizer), overwrite=True)
    minutes = (time.perf_counter() - started) / 60
    say(f"train: {result.last_step} steps in {minutes:.1f} min -> {model_dir}")
    return model_dir, minutes


# ---------------------------------------------------------------------------------------------------------------
# 6. evaluation


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _answer_rows(model, tokenizer, rows: list[tuple[list, list[int]]], batch_size: int, sampling) -> list[str]:
    from af2_jax.inference.requests import answer_prompts

    answers = []
    for chunk in _batches(rows, batch_size):
        pad = batch_size - len(chunk)  # a fixed batch size: one compiled program per layout
        chunk = chunk + [chunk[-1]] * pad
        out = answer_prompts(model, tokenizer, [r[0] for r in chunk], [r[1] for r in chunk], sampling)
        answers.extend(out[:len(out) - pad])
    return answers


def evaluate_icl(model, tokenizer, index, embedder, data: pathlib.Path, *, seed: int, batch_size: int) -> dict:
    """Each held-out clip is one query, with made-up names drawn for it; asked zero-shot, with 4 random training
    examples, and with its 4 retrieved nearest training clips (the same names in all three)."""
    import numpy as np

    from af2_jax.data import manifests
    from af2_jax.data import synthetic_icl as icl
    from af2_jax.inference.requests import entry_windows, text_prompt_ids
    from af2_jax.inference.sampling import SamplingConfig
    from af2_jax.retrieval import embed, fewshot
    from af2_jax.tokenizer import encode_prompt, format_icl_prompt

    tests = manifests.read_jsonl(data / "test.jsonl")
    vectors = embed.embed_records(embedder, tests, batch_size=16)
    retrieved = fewshot.retrieve_shots(index, vectors, SHOTS, seed=seed + 100,
                                       query_files=[t["audio"] for t in tests])
    windows = {}

    def clip(entry):
        if entry["audio"] not in windows:
            windows[entry["audio"]] = entry_windows(entry, 1)
        return windows[entry["audio"]]

    conditions = {"zero_shot": [], "random_4_shot": [], "retrieved_4_shot": []}
    facts = []
    for q, test in enumerate(tests):
        rng = np.random.default_rng([seed, 11, q])
        names = icl.episode_names(rng)
        random_rows = fewshot.random_shots(index.entries, SHOTS, fewshot.query_rng(seed + 200, q),
                                           query_file=test["audio"])
        conditions["zero_shot"].append(([clip(test)], encode_prompt(tokenizer, icl.NAME_PROMPT)))
        for name, rows, kind in (("random_4_shot", random_rows, "random"),
                                 ("retrieved_4_shot", retrieved[q], "similar")):
            shots = [index.entries[r] for r in rows]
            text = format_icl_prompt([(icl.NAME_PROMPT, names[s["skill"]]) for s in shots], icl.NAME_PROMPT,
                                     kind=kind)
            conditions[name].append(([clip(s) for s in shots] + [clip(test)],
                                     text_prompt_ids(tokenizer, text, audios=len(shots) + 1)))
        facts.append({"class": test["skill"], "names": names,
                      "random": [index.entries[r]["skill"] for r in random_rows],
                      "retrieved": [index.entries[r]["skill"] for r in retrieved[q]]})
    sampling = SamplingConfig(max_new_tokens=4)
    results = {"queries": len(tests), "chance_k_shot": 1 / len(icl.CLASSES), "chance_zero_shot": 1 / len(icl.NAMES)}
    predictions = {}
    for name, rows in conditions.items():
        answers = _answer_rows(model, tokenizer, rows, batch_size, sampling)
        predictions[name] = answers
        results[name] = float(np.mean([a == f["names"][f["class"]] for a, f in zip(answers, facts)]))
    for name, key in (("random_4_shot", "random"), ("retrieved_4_shot", "retrieved")):
        shown = [f["class"] in f[key] for f in facts]
        results[f"{name}_class_shown"] = float(np.mean(shown))  # the ceiling: otherwise the name is unknowable
        results[f"{name}_majority_name"] = float(np.mean([_majority_hit(f[key], f["class"]) for f in facts]))
        correct = [a == f["names"][f["class"]] for a, f in zip(predictions[name], facts)]
        results[f"{name}_when_shown"] = float(np.mean([c for c, s in zip(correct, shown) if s])) if any(shown) else 0.0
        results[f"{name}_same_class_share"] = float(np.mean([np.mean([c == f["class"] for c in f[key]])
                                                             for f in facts]))
    results["predictions"] = [{"class": f["class"], "answer": f["names"][f["class"]],
                               **{k: predictions[k][i] for k in conditions}} for i, f in enumerate(facts)]
    return results


def _majority_hit(shown: list[str], target: str) -> float:
    """The expected accuracy of answering the name shown most often (ties broken at random): what copying without
    looking at the query's audio gets."""
    counts = collections.Counter(shown)
    best = max(counts.values())
    tied = [c for c, n in counts.items() if n == best]
    return (target in tied) / len(tied)


def evaluate_chat(model, tokenizer, data: pathlib.Path, *, batch_size: int) -> dict:
    """Held-out two-round dialogues: round 1 (how many beeps / noise bursts?) and round 2 ('and one more than
    that?') with the model's own round-1 answer as history, with the true one, and with no history at all."""
    import numpy as np

    from af2_jax.data import synthetic
    from af2_jax.data.examples import load_waveform
    from af2_jax.audio.windows import make_windows
    from af2_jax.inference.requests import text_prompt_ids
    from af2_jax.inference.sampling import SamplingConfig
    from af2_jax.tokenizer import format_chat_prompt

    rows = [json.loads(line) for line in (data / "chat-test.jsonl").read_text().splitlines() if line.strip()]
    clips = [[make_windows(load_waveform(r, 1), 1)] for r in rows]
    sampling = SamplingConfig(max_new_tokens=4)

    def ask(history_of, question_of):
        prompts = [text_prompt_ids(tokenizer, format_chat_prompt(history_of(i), question_of(i)), audios=1)
                   for i in range(len(rows))]
        return _answer_rows(model, tokenizer, list(zip(clips, prompts)), batch_size, sampling)

    first = ask(lambda i: [], lambda i: rows[i]["dialogue"][0][0])
    own = ask(lambda i: [(rows[i]["dialogue"][0][0], first[i])], lambda i: rows[i]["dialogue"][1][0])
    gold = ask(lambda i: [tuple(rows[i]["dialogue"][0])], lambda i: rows[i]["dialogue"][1][0])
    alone = ask(lambda i: [], lambda i: rows[i]["dialogue"][1][0])
    words = synthetic.NUMBER_WORDS
    successor = {w: words[k + 1] for k, w in enumerate(words[:-1])}
    truth1 = [r["dialogue"][0][1] for r in rows]
    truth2 = [r["dialogue"][1][1] for r in rows]
    other = [words[r["counts"]["noise" if r["asked"] == "beep" else "beep"]] for r in rows]  # one more than the other count
    return {
        "dialogues": len(rows),
        "chance_turn1": 1 / 3, "chance_turn2": 1 / 3,
        "turn1": float(np.mean([a == t for a, t in zip(first, truth1)])),
        "turn2_own_history": float(np.mean([a == t for a, t in zip(own, truth2)])),
        "turn2_follows_own_turn1": float(np.mean([successor.get(f) == a for f, a in zip(first, own)])),
        "turn2_true_history": float(np.mean([a == t for a, t in zip(gold, truth2)])),
        "turn2_no_history": float(np.mean([a == t for a, t in zip(alone, truth2)])),
        "turn2_no_history_other_count": float(np.mean([a == o for a, o in zip(alone, other)])),
        "predictions": [{"dialogue": r["dialogue"], "turn1": a, "turn2": b, "turn2_true_history": g,
                         "turn2_no_history": c} for r, a, b, g, c in zip(rows, first, own, gold, alone)],
    }


def table(results: dict) -> str:
    icl, chat = results["icl"], results["chat"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [f"few-shot naming ({icl['queries']} held-out queries)   accuracy %   class shown %   "
             f"majority name %",
             f"  zero-shot                              {pct(icl['zero_shot']):>6}"
             f"           -               -     (chance {pct(icl['chance_zero_shot'])})",
             f"  random 4-shot                          {pct(icl['random_4_shot']):>6}"
             f"      {pct(icl['random_4_shot_class_shown']):>6}          {pct(icl['random_4_shot_majority_name']):>6}",
             f"  retrieved 4-shot                       {pct(icl['retrieved_4_shot']):>6}"
             f"      {pct(icl['retrieved_4_shot_class_shown']):>6}          "
             f"{pct(icl['retrieved_4_shot_majority_name']):>6}",
             f"  chance (one of the {round(1 / icl['chance_k_shot'])} names)            {pct(icl['chance_k_shot']):>6}",
             f"chat ({chat['dialogues']} held-out dialogues)",
             f"  turn 1 count                           {pct(chat['turn1']):>6}   (chance {pct(chat['chance_turn1'])})",
             f"  turn 2, own history                    {pct(chat['turn2_own_history']):>6}",
             f"  turn 2 = own turn 1 + 1                {pct(chat['turn2_follows_own_turn1']):>6}",
             f"  turn 2, true history                   {pct(chat['turn2_true_history']):>6}",
             f"  turn 2, no history                     {pct(chat['turn2_no_history']):>6}"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    use_cpu_devices(args.cpu_devices)
    from absl import logging as absl_logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # build_index.py beside this file

    import jax

    from af2_jax import pretrained
    from af2_jax.retrieval import embed, index as index_lib
    from af2_jax.tokenizer import AF2Tokenizer
    from af2_jax.training import run_config

    total = time.perf_counter()
    workdir = pathlib.Path(args.workdir).absolute()
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    import importlib.util

    spec = importlib.util.spec_from_file_location("af2_configs_icl", run_config.CONFIGS_DIR / "icl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(str(data))
    cfg.seed = args.seed
    if args.steps:
        cfg.num_steps = args.steps

    write_data(args, data)
    tokenizer = AF2Tokenizer.from_dir(data / "tokenizer")
    config = model_config(cfg, tokenizer)
    write_init_model(cfg, config, tokenizer, data, args.seed)
    index_dir = workdir / "index"
    build_index(data, index_dir, args.progress)
    index = index_lib.load_index(index_dir)
    embedder = embed.load_embedder(data / "init")
    write_episodes(args, data, index, index.index.reconstruct_n(0, len(index)))
    run_config.validate(cfg)
    model_dir, train_minutes = train(cfg, config, workdir)

    started = time.perf_counter()
    model = pretrained.load_model(model_dir)
    tokenizer = pretrained.load_tokenizer(model_dir)
    results = {"workdir": str(workdir), "steps": cfg.num_steps, "train_minutes": train_minutes,
               "devices": jax.device_count(),
               "icl": evaluate_icl(model, tokenizer, index, embedder, data, seed=args.seed,
                                   batch_size=args.eval_batch_size),
               "chat": evaluate_chat(model, tokenizer, data, batch_size=args.eval_batch_size)}
    results["eval_minutes"] = (time.perf_counter() - started) / 60
    results["total_minutes"] = (time.perf_counter() - total) / 60
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    say("\n" + table(results))
    say(f"\nevaluation {results['eval_minutes']:.1f} min, total {results['total_minutes']:.1f} min; "
        f"{workdir / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
