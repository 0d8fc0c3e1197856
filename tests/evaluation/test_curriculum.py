"""launch/curriculum.py: its option parsing, and the whole curriculum run for a handful of steps.

The run trains stage 1 normally, and stages 2 and 3 with learning rate 0: then each later stage's exported weights
must equal the previous stage's bit for bit if, and only if, it started from them (a random start would differ,
e.g. its cross-attention gates would still be at their initial 0 while stage 1 moved them)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from af2_jax import pretrained
from af2_jax.evaluation import report
from tests.scripts import load_script

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_parse_overrides():
    curriculum = load_script("launch/curriculum.py")
    got = curriculum.parse_overrides(["3:max_windows=6", "all:seed=1", "2:tokenizer=/tmp/tok",
                                      "1:optimizer.learning_rate=0.0"])
    assert got == {0: [("seed", 1)], 1: [("seed", 1), ("optimizer.learning_rate", 0.0)],
                   2: [("seed", 1), ("tokenizer", "/tmp/tok")], 3: [("max_windows", 6), ("seed", 1)]}
    assert curriculum.parse_overrides(["clap:batch_size=4"])[0] == [("batch_size", 4)]  # stage 0 = AF-CLAP
    for bad in ("max_windows=6", "4:seed=1", "2:seed", "0:seed=1"):
        with pytest.raises(SystemExit):
            curriculum.parse_overrides([bad])


def test_cpu_devices_adds_the_host_device_count_unless_xla_flags_sets_one(monkeypatch):
    curriculum = load_script("launch/curriculum.py")
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    curriculum.use_cpu_devices(2)
    assert os.environ["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=0",
                                               "--xla_force_host_platform_device_count=2"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    curriculum.use_cpu_devices(2)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"  # the user's choice wins
    monkeypatch.delenv("XLA_FLAGS")
    curriculum.use_cpu_devices(1)
    assert "XLA_FLAGS" not in os.environ
    with pytest.raises(SystemExit, match="cpu-devices"):
        curriculum.use_cpu_devices(0)


def test_stage_configs_chain_init_from_and_take_overrides(tmp_path):
    curriculum = load_script("launch/curriculum.py")
    args = curriculum.build_parser().parse_args(["--workdir", str(tmp_path), "--clap", "--stage2-steps", "7",
                                                 "--set", "2:optimizer.learning_rate=0.0"])
    overrides = curriculum.parse_overrides(args.set)
    configs = {s: curriculum.stage_config(args, s, overrides) for s in (0, 1, 2, 3)}
    assert configs[0].task == "afclap" and configs[0].init_from == ""
    assert configs[1].init_from == f"htsat={tmp_path / 'clap'}"  # the tiny recipe starts from its AF-CLAP
    assert configs[2].init_from == str(tmp_path / "stage1") and configs[3].init_from == str(tmp_path / "stage2")
    assert configs[2].num_steps == 7 and configs[2].optimizer.learning_rate == 0.0
    for flags in (["--no-clap"], []):  # off by default
        no_clap = curriculum.build_parser().parse_args(["--workdir", str(tmp_path), *flags])
        assert curriculum.stage_config(no_clap, 1, overrides).init_from == ""
    with pytest.raises(SystemExit, match="no field"):
        curriculum.stage_config(args, 1, curriculum.parse_overrides(["1:optimizer.nonexistent=1"]))


def _text_side_params(stage_dir):
    """Weights of the cross-attention, audio transformer and LLM (HTSAT's BatchNorm statistics move even at lr 0)."""
    _, params = pretrained.load(stage_dir / "final")
    return {k: np.asarray(v) for k, v in params.items() if not k.startswith("htsat/")}


@pytest.mark.slow
def test_curriculum_runs_three_chained_stages_and_reports(tmp_path):
    # The README's command plus --clap (to cover the AF-CLAP stage), as a fresh process (its own JAX configuration: two CPU
    # devices, --cpu-devices' default).
    # Stage 3 keeps stage 2's shapes (batch 8, one window) so its programs come from the compilation cache:
    # compiling dominates here.
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # compile fast, as tests/conftest.py
    command = [sys.executable, str(REPO / "launch" / "curriculum.py"), "--preset", "tiny", "--workdir", str(workdir),
               "--clap", "--clap-steps", "2", "--set", "clap:batch_size=4", "--eval-clap-examples", "4",
               "--stage1-steps", "3", "--stage2-steps", "2", "--stage3-steps", "2",
               "--set", "2:optimizer.learning_rate=0.0", "--set", "3:optimizer.learning_rate=0.0",
               "--set", "3:max_windows=1", "--set", "3:batch_size=8",
               "--eval-examples-per-skill", "1", "--eval-long-examples-per-skill", "1", "--eval-batch-size", "8",
               "--max-new-tokens", "4", "--no-progress"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    printed = done.stdout

    stage = {s: _text_side_params(workdir / f"stage{s}") for s in (1, 2, 3)}
    gates = [k for k in stage[1] if k.endswith("attn_gate")]
    assert gates and any(np.any(stage[1][k] != 0) for k in gates), "stage 1 did not move the gates from 0"
    # stage 1 starts from the AF-CLAP stage's audio half and keeps it frozen (BatchNorm statistics aside)
    _, clap_params = pretrained.load(workdir / "clap" / "final")
    _, stage1_params = pretrained.load(workdir / "stage1" / "final")
    kernels = [k for k in clap_params if k.startswith("htsat/") and k.endswith("kernel")]
    assert kernels and all(k in stage1_params for k in kernels)
    for key in kernels:
        np.testing.assert_array_equal(np.asarray(stage1_params[key]), np.asarray(clap_params[key]), err_msg=key)
    assert json.loads((workdir / "stage1" / "run_config.json").read_text())["init_from"] == \
        f"htsat={workdir / 'clap'}"
    for later in (2, 3):
        assert stage[later].keys() == stage[1].keys()
        for key, value in stage[later - 1].items():
            np.testing.assert_array_equal(stage[later][key], value, err_msg=f"stage {later} {key}")
        run_config = json.loads((workdir / f"stage{later}" / "run_config.json").read_text())
        assert run_config["init_from"] == str(workdir / f"stage{later - 1}")

    for s, steps in ((1, 3), (2, 2), (3, 2)):
        lines = (workdir / f"stage{s}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))
    assert (workdir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = report.read_json(workdir / "results.json")
    assert results["plot"] == str(workdir / "training_curves.png")
    assert set(results["evaluations"]) == {"clap", "2", "3"}
    clap = results["evaluations"]["clap"]
    assert clap["clips"] == 4 and {"audio_to_text_R@1", "text_to_audio_R@10"} <= set(clap)
    short = {"count", "order", "pitch"}  # the skills the issue asks the tiny curriculum to teach
    assert set(results["evaluations"]["2"]["tasks"]) == short
    assert set(results["evaluations"]["3"]["tasks"]) == short | {"long_order"}
    for s in ("2", "3"):
        payload = report.read_json(workdir / f"eval_stage{s}.json")
        assert payload["tasks"] == results["evaluations"][s]["tasks"]
        assert len(payload["predictions"]) == payload["metadata"]["data"]["num_examples"]
    assert "after stage 2 %" in printed and "after stage 3 %" in printed and "long_order" in printed
