"""Two processes x 4 CPU devices with jax.distributed on localhost: they run steps over one 8-device mesh, save a
checkpoint together and resume from it; their losses equal a single process's on 8 devices."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from af2_jax.training import loop
from helpers import random_batches, stage_config

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir, max_steps):
    coordinator = f"localhost:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), coordinator, str(i), str(workdir), str(max_steps)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outputs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    first = _run_two_processes(tmp_path / "run", max_steps=2)
    assert [o["status"] for o in first] == ["stopped", "stopped"]
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    data_files = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "2" / "data").glob("process_*"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    second = _run_two_processes(tmp_path / "run", max_steps=5)
    assert [o["status"] for o in second] == ["finished", "finished"]
    assert second[0]["steps"] == [3]
    for o in (first, second):
        assert o[0]["losses"] == o[1]["losses"]  # every process reads the same replicated metrics

    cfg = stage_config(1, num_steps=3, export_final=False, **{"mesh.data": 2, "mesh.fsdp": 4})
    single = loop.train(cfg, tmp_path / "single", make_iterator=random_batches())
    np.testing.assert_allclose(first[0]["losses"] + second[0]["losses"], [r["loss"] for r in single.records],
                               rtol=0, atol=1e-5)
