"""AF-CLAP pretraining through the curriculum's own loop (task 'afclap', configs/clap.py): the step trains every
parameter on the composition-aware loss, clamps the logit scales as the reference does after each update, resumes
with the same data order, and exports an AF-CLAP model whose HTSAT initialises AF2 stage 1."""

import numpy as np
import pytest

from af2_jax import pretrained
from af2_jax.training import loop
from helpers import apply_overrides, flat
from tests.scripts import load_script

STEPS = 2


def clap_config(**overrides):
    cfg = load_script("configs/clap.py").get_config("tiny")
    cfg.batch_size, cfg.num_steps, cfg.log_every = 8, STEPS, 1
    cfg.optimizer.warmup_steps = 0
    cfg.mesh.fsdp = 1
    cfg.checkpoint.every_steps, cfg.checkpoint.async_save = 1, False
    cfg.data.sources = (dict(kind="synthetic_captions", split="train", num_examples=64, seed=0, weight=1.0),)
    return apply_overrides(cfg, overrides)


@pytest.fixture(scope="module")
def clap_run(tmp_path_factory):
    # a logit scale above the reference's ceiling ln(100): the first update must bring it back down
    workdir = tmp_path_factory.mktemp("clap")
    result = loop.train(clap_config(**{"model.overrides": {"logit_scale_init": 6.0}}), workdir)
    return workdir, result


def test_every_parameter_trains_and_the_logit_scales_are_clamped(clap_run):
    workdir, result = clap_run
    assert result.status == "finished" and [r["step"] for r in result.records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in result.records)
    trained = flat(result.state["trainable"])
    assert {k.split("/")[0] for k in trained} >= {"htsat", "t5", "audio_projection", "text_projection",
                                                  "logit_scale_a"}
    assert result.records[0]["logit_scale"] == pytest.approx(np.exp(6.0), rel=1e-5)  # before the first clamp
    assert result.records[1]["logit_scale"] == pytest.approx(100.0, rel=1e-6)  # step 1's update clamped it
    for name in ("logit_scale_a", "logit_scale_t"):  # step 2's update may lower it, never above the ceiling
        assert 0.0 <= float(trained[name]) <= np.log(100.0) + 1e-6


def test_export_is_an_afclap_model_whose_htsat_starts_stage1(clap_run, tmp_path):
    workdir, result = clap_run
    kind, config = pretrained.read_config(workdir / "final")
    assert kind == "afclap" and config.htsat.depths == (2, 2, 2, 2)
    assert len(pretrained.load_tokenizer(workdir)("a beep")[0][0]) == 77
    from helpers import random_batches, stage_config

    cfg = stage_config(1, init_from=f"htsat={workdir}")
    started = loop.train(cfg, tmp_path / "s1", make_iterator=random_batches(), max_steps=0)
    got = {**flat(started.state["batch_stats"]), **flat(started.frozen), **flat(started.state["trainable"])}
    clap_htsat = {k: v for k, v in flat(result.state["trainable"]).items() if k.startswith("htsat/")}
    assert clap_htsat
    for key, value in clap_htsat.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_resume_continues_with_the_same_batches(clap_run, tmp_path):
    _, uninterrupted = clap_run
    cfg = clap_config(**{"model.overrides": {"logit_scale_init": 6.0}})
    first = loop.train(cfg, tmp_path, max_steps=1)
    assert first.status == "stopped"
    resumed = loop.train(cfg, tmp_path)
    assert [r["step"] for r in resumed.records] == [2]
    np.testing.assert_allclose(resumed.records[0]["loss"], uninterrupted.records[1]["loss"], rtol=1e-6)
