"""Nothing is lost: a run stopped by SIGTERM saves a checkpoint, and resuming it reproduces the uninterrupted run's
losses exactly (same data order); resuming onto a different mesh continues identically (to fp32 rounding)."""
import os
import shutil
import signal

import numpy as np

from af2_jax.training import loop
from helpers import random_batches, stage_config


def _sigterm_at(batch_index):
    def hook(index):
        if index == batch_index:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the loop's handler before this batch's step ends
    return hook


def test_sigterm_then_resume_reproduces_uninterrupted_run(tmp_path):
    cfg = stage_config(1, num_steps=5, export_final=False)
    reference = loop.train(cfg, tmp_path / "uninterrupted", make_iterator=random_batches())
    assert reference.status == "finished"
    reference_losses = [r["loss"] for r in reference.records]

    interrupted = loop.train(cfg, tmp_path / "run", make_iterator=random_batches(on_batch=_sigterm_at(2)))
    assert interrupted.status == "preempted" and interrupted.last_step == 3  # checkpoint at 3, not a multiple of 2
    shutil.copytree(tmp_path / "run", tmp_path / "run_on_other_mesh")

    resumed = loop.train(cfg, tmp_path / "run", make_iterator=random_batches())
    assert resumed.status == "finished"
    losses = [r["loss"] for r in interrupted.records] + [r["loss"] for r in resumed.records]
    assert [r["step"] for r in resumed.records] == [4, 5]
    assert losses == reference_losses  # exactly: same mesh, same data, same state

    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    other_mesh = loop.train(cfg, tmp_path / "run_on_other_mesh", make_iterator=random_batches())
    np.testing.assert_allclose([r["loss"] for r in other_mesh.records], reference_losses[3:], rtol=0, atol=1e-5)
