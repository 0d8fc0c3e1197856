"""Stage chaining and the command line, with the real tiny AF2: a finished stage exports `final/` (loadable by
af2_jax.pretrained, same logits as the trained state); the next stage's `init_from` (a workdir, a pretrained-format
directory, a PREFIX=dir source, an unfinished workdir's checkpoint) loads exactly the previous weights; a non-finite
loss stops the run and keeps the last good checkpoint; launch/train.py runs as a command."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from af2_jax import pretrained
from af2_jax.training import loop
from helpers import REPO, TOKENS, RandomBatches, flat, model_config, random_batches, stage_config


def _all_variables(result):
    """Every variable of a run's model (trainable, statistics, frozen) as '/'-pathed host arrays."""
    return {**flat(result.state["trainable"]), **flat(result.state["batch_stats"]), **flat(result.frozen)}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stage1")
    result = loop.train(stage_config(1, num_steps=2, export_final=True), workdir, make_iterator=random_batches())
    assert result.status == "finished"
    return workdir, result


def test_export_final_loads_with_the_trained_weights_and_logits(stage1):
    workdir, result = stage1
    loaded = pretrained.load_model(workdir / "final")
    assert pretrained.read_config(workdir / "final")[1] == model_config(stage_config(1))
    trained = result.split.merge(result.state["trainable"], result.state["batch_stats"], result.frozen)
    expected = {k: v for k, v in _all_variables(result).items()}
    got = flat(nnx.state(loaded))
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    batch = next(RandomBatches(2))
    args = [jnp.asarray(batch[k]) for k in ("audio", "audio_mask", "input_ids", "attention_mask")]
    with jax.set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))):
        trained_logits = np.asarray(trained(*args))
    np.testing.assert_allclose(np.asarray(loaded(*args)), trained_logits, rtol=0, atol=1e-6)
    assert np.isfinite(trained_logits).all() and trained_logits.std() > 0


@pytest.mark.parametrize("source", ["workdir", "final"])
def test_stage2_init_from_loads_the_stage1_final_weights(stage1, tmp_path, source):
    workdir, result = stage1
    init_from = str(workdir if source == "workdir" else workdir / "final")
    cfg = stage_config(2, init_from=init_from)
    loaded = loop.train(cfg, tmp_path / "s2", make_iterator=random_batches(), max_steps=0)
    expected, got = _all_variables(result), _all_variables(loaded)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert any(k.startswith("htsat/") for k in flat(loaded.state["trainable"]))  # stage 2 trains HTSAT


def test_stage2_can_fine_tune_htsat_with_its_statistics_fixed(stage1, tmp_path):
    """htsat_train_mode=False (the tiny recipe): HTSAT's weights train, in eval mode, so its BatchNorm running
    statistics stay stage 1's (training mode would move them: test_freezing)."""
    workdir, first = stage1
    cfg = stage_config(2, init_from=str(workdir), htsat_train_mode=False, num_steps=1)
    second = loop.train(cfg, tmp_path / "s2", make_iterator=random_batches())
    before, after = _all_variables(first), _all_variables(second)
    trained_htsat = [k for k in flat(second.state["trainable"]) if k.startswith("htsat/")]
    assert trained_htsat and any(not np.array_equal(after[k], before[k]) for k in trained_htsat)
    stats = flat(second.state["batch_stats"])
    assert stats and all(np.array_equal(after[k], before[k]) for k in stats)


def test_init_from_prefix_source_replaces_that_component(stage1, tmp_path):
    workdir, result = stage1
    expected = _all_variables(result)
    llm = {k[len("llm/"):]: v + 1.0 for k, v in expected.items() if k.startswith("llm/")}
    pretrained.save(tmp_path / "llm", model_config(stage_config(1)).llm, llm)
    cfg = stage_config(2, init_from=f"{workdir / 'final'},llm={tmp_path / 'llm'}")
    got = _all_variables(loop.train(cfg, tmp_path / "s2", make_iterator=random_batches(), max_steps=0))
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key] + 1.0 if key.startswith("llm/") else expected[key],
                                      err_msg=key)


def test_init_from_unfinished_workdir_lays_its_checkpoint_over_its_own_init_from(stage1, tmp_path):
    workdir, result = stage1
    cfg = stage_config(2, init_from=str(workdir))
    unfinished = loop.train(cfg, tmp_path / "s2", make_iterator=random_batches(), max_steps=2)
    assert unfinished.status == "stopped" and not (tmp_path / "s2" / "final").exists()
    got = _all_variables(loop.train(stage_config(3, init_from=str(tmp_path / "s2")), tmp_path / "s3",
                                    make_iterator=random_batches(), max_steps=0))
    # stage 2's trained weights and statistics after its 2 steps, stage 1's final weights for the rest
    expected = {**_all_variables(result), **flat(unfinished.state["trainable"]),
                **flat(unfinished.state["batch_stats"])}
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert any(not np.array_equal(got[k], v) for k, v in _all_variables(result).items())


def test_init_from_an_interrupted_random_stage1_regenerates_its_frozen_weights(tmp_path):
    """Stage 1 from random weights, stopped before it finished: its frozen weights (never checkpointed) come back
    from its seed, its calibrated feature norm from beside its checkpoints, its trained ones from the checkpoint."""
    cfg = stage_config(1, num_steps=4, **{"model.calibrate_feature_norm": 0.3})
    interrupted = loop.train(cfg, tmp_path / "s1", make_iterator=random_batches(), max_steps=2)
    assert interrupted.status == "stopped"
    got = _all_variables(loop.train(stage_config(2, init_from=str(tmp_path / "s1")), tmp_path / "s2",
                                    make_iterator=random_batches(), max_steps=0))
    expected = _all_variables(interrupted)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = stage_config(1, num_steps=4)
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss nan .* at step 3.* last good checkpoint "
                                                      r"is step 2"):
        loop.train(cfg, tmp_path, make_iterator=random_batches(nan_at=2))  # batch index 2 = step 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    resumed = loop.train(cfg, tmp_path, make_iterator=random_batches(), max_steps=1)  # the kept state is usable
    assert resumed.records[0]["step"] == 3 and np.isfinite(resumed.records[0]["loss"])


def test_launch_train_runs_as_a_command(tmp_path, compilation_cache_dir):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(compilation_cache_dir),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    overrides = {"num_steps": 2, "max_windows": 1, "max_tokens": TOKENS, "batch_size": 8, "mesh.fsdp": 1,
                 "model.htsat_depths": "(2,2,2,2)", "checkpoint.every_steps": 1, "optimizer.warmup_steps": 0,
                 "log_every": 1}
    command = [sys.executable, str(REPO / "launch" / "train.py"), "--config", f"{REPO / 'configs' / 'stage1.py'}:tiny",
               "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in records)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
    assert pretrained.read_config(workdir / "final")[1].htsat.depths == (2, 2, 2, 2)
    assert json.loads((workdir / "run_config.json").read_text())["num_steps"] == 2
    assert "AF2 stage 1, preset tiny" in proc.stderr and "starts from: random weights" in proc.stderr
    assert "compiling the train step" in proc.stderr


def test_launch_train_config_errors_are_one_line_and_create_nothing(tmp_path):
    workdir = tmp_path / "never"
    stage1 = f"{REPO / 'configs' / 'stage1.py'}:tiny"
    cases = [(["--config", str(REPO / "configs" / "nope.py")], "nope.py"),
             (["--config", stage1, "--config.nonexistent_field=1"], "no field 'nonexistent_field'"),
             (["--config", stage1, "--config.batch_size=0"], "batch_size must be a number >= 1, got 0"),
             (["--config", f"{REPO / 'configs' / 'stage1.py'}:huge"], "unknown preset 'huge'"),
             (["--config", stage1, f"--config.init_from={tmp_path / 'missing'}"], "missing")]
    for args, expected in cases:
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--workdir", str(workdir), *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert len(errors) == 1 and expected in errors[0], (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and not workdir.exists(), args


def test_all_unreadable_training_data_stops_with_a_clear_error(tmp_path):
    manifest = tmp_path / "allbad.jsonl"
    manifest.write_text("".join(json.dumps({"audio": str(tmp_path / f"gone{i}.wav"), "prompt": "q", "answer": "a"})
                                + "\n" for i in range(3)))
    command = [sys.executable, str(REPO / "launch" / "train.py"), "--config", f"{REPO / 'configs' / 'stage1.py'}:tiny",
               "--workdir", str(tmp_path / "run"),
               f"--config.data.sources=({{'kind': 'jsonl', 'path': '{manifest}', 'weight': 1.0}},)"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1000 records in a row could not be used" in proc.stderr and "gone" in proc.stderr
    assert "Traceback" not in proc.stderr
