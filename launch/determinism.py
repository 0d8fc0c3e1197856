"""Is a training run reproducible? Runs the same short stage several times, each in a fresh process under its own
XLA settings, and compares the losses and the trained weights bit for bit against the first run.

    python launch/determinism.py --stage 1 --steps 30
    python launch/determinism.py --variant "" --variant "--xla_cpu_max_isa=AVX" --variant "devices=1"

A variant is XLA_FLAGS text added to the run ('' = as launch/curriculum.py runs: 2 CPU host devices), or
`devices=N` for N host devices. Every run uses the same config, seed and data. Written for issue 16's question
(why a fresh clone's main job differs from docs/RESULTS.md); not yet run: its findings belong in docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

_RUN = """
import json, sys
import numpy as np
sys.path.insert(0, {repo!r})
from af2_jax import param_tree
from af2_jax.training import loop
from af2_jax.training.run_config import load_stage_config
cfg = load_stage_config({stage}, "tiny")
cfg.num_steps, cfg.log_every, cfg.export_final = {steps}, 1, False
cfg.checkpoint.every_steps = {steps}
cfg.seed = {seed}
result = loop.train(cfg, sys.argv[1])
params = {{k: np.asarray(v) for k, v in param_tree.model_params(result.state["trainable"]).items()}}
np.savez(sys.argv[1] + "/trained.npz", **{{k.replace("/", "|"): v for k, v in params.items()}})
json.dump([r["loss"] for r in result.records], open(sys.argv[1] + "/losses.json", "w"))
"""


def run(variant: str, stage: int, steps: int, seed: int, workdir: pathlib.Path) -> tuple[list[float], dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    devices = 2
    flags = variant
    if variant.startswith("devices="):
        devices, flags = int(variant.split("=", 1)[1]), ""
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} " if devices > 1 else "") + flags
    code = _RUN.format(repo=str(REPO), stage=stage, steps=steps, seed=seed)
    done = subprocess.run([sys.executable, "-c", code, str(workdir)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"variant {variant!r} failed:\n{done.stderr[-3000:]}")
    import numpy as np

    losses = json.loads((workdir / "losses.json").read_text())
    with np.load(workdir / "trained.npz") as data:
        params = {k: data[k] for k in data.files}
    return losses, params


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", action="append", default=None,
                   help="XLA_FLAGS text or devices=N (repeatable; default: the same run twice, then AVX only, "
                        "then one device)")
    args = p.parse_args(argv)
    import numpy as np

    variants = args.variant if args.variant is not None else ["", "", "--xla_cpu_max_isa=AVX", "devices=1"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for k, variant in enumerate(variants):
            losses, params = run(variant, args.stage, args.steps, args.seed, pathlib.Path(tmp) / str(k))
            if reference is None:
                reference = (losses, params)
            same_bits = all(np.array_equal(params[key].view(np.uint8), reference[1][key].view(np.uint8))
                            for key in params)
            max_diff = max(float(np.max(np.abs(params[key].astype(np.float64) - reference[1][key])))
                           for key in params)
            first_diff = next((i + 1 for i, (a, b) in enumerate(zip(losses, reference[0])) if a != b), None)
            row = {"variant": variant or "(default)", "final_loss": losses[-1], "bit_identical": same_bits,
                   "max_weight_diff": max_diff, "first_step_whose_loss_differs": first_diff}
            results.append(row)
            print(json.dumps(row), flush=True)
    return {"stage": args.stage, "steps": args.steps, "runs": results}


if __name__ == "__main__":
    main()
