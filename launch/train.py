"""Train one stage of the AF2 curriculum.

    python launch/train.py --config configs/stage1.py:tiny --workdir runs/s1
    python launch/train.py --config configs/stage2.py:tiny --workdir runs/s2 --config.init_from=runs/s1
    python launch/train.py --config configs/stage1.py:3b --workdir gs://.../s1 \
        --config.init_from=llm=/ckpt/qwen2.5-3b,htsat=/ckpt/af-clap --config.tokenizer=/ckpt/qwen2.5-3b

Re-running the same command resumes from the newest checkpoint in the workdir (same data order). SIGTERM/SIGINT
save a checkpoint and exit 0; a non-finite loss exits 1 and keeps the last good checkpoint. Logs go to the console,
<workdir>/metrics.jsonl and <workdir>/tensorboard; the finished model is exported to <workdir>/final.
Multi-host: start one process per host (launch/tpu_pod.sh, launch/slurm_gpu.sbatch); jax.distributed is
initialised from the environment, or from --coordinator_address/--num_processes/--process_id.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/stageN.py:PRESET", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, final model)", required=True)
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "stop after this many steps of this invocation")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host, optional)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "number of processes (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator_address)")


def main(argv):
    del argv
    from af2_jax.training import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from af2_jax.training import loop

    cfg = _CONFIG.value
    logging.info("config:\n%s", cfg)
    try:
        result = loop.train(cfg, _WORKDIR.value, max_steps=_MAX_STEPS.value)
    except loop.NonFiniteLossError as e:
        logging.error("%s", e)
        sys.exit(1)
    logging.info("%s at step %d", result.status, result.last_step)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
