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

import logging  # noqa: E402

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/stageN.py:PRESET", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, final model)", required=True)
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "stop after this many steps of this invocation")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host, optional)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "number of processes (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator_address)")


def _error(message: str) -> None:
    """One line on stderr and exit 2: a bad command line or config is the user's to fix, not a crash."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _unknown_field(error: Exception, argv: list[str]) -> str:
    name = str(error).strip().strip('"').strip("'").splitlines()[0]
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0]]
    return f"{overrides[0] if overrides else name}: the config has no field {name!r}"


def _root_message(error: BaseException) -> str:
    while error.__cause__ is not None:  # ml_collections wraps the real reason (a missing file...)
        error = error.__cause__
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but a bad flag, config file or override is one line (absl would print a traceback)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e)
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        _error(f"{text.splitlines()[0]} {last}" if "Traceback" in text else text)
    except (AttributeError, KeyError) as e:  # an override naming a field the config does not have
        _error(_unknown_field(e, argv))


def load_config():
    """The --config file with its --config.* overrides applied (ml_collections applies them on first access)."""
    try:
        cfg = _CONFIG.value
        cfg.to_json_best_effort()  # a config that failed to load raises on first access
        return cfg
    except (AttributeError, KeyError) as e:
        _error(_unknown_field(e, sys.argv))
    except (OSError, TypeError, ValueError) as e:
        _error(_root_message(e))


def main(argv):
    del argv
    cfg = load_config()
    from af2_jax.training import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    absl_logging.set_verbosity(absl_logging.INFO)
    for noisy in ("orbax", "absl"):  # per-save INFO lines; the loop says what matters
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from af2_jax.data.bucketing import NoUsableDataError
    from af2_jax.param_tree import ConversionError
    from af2_jax.tokenizer import TokenizerError
    from af2_jax.training import loop
    from af2_jax.training.initialization import InitFromError
    from af2_jax.training.run_config import ConfigError
    from af2_jax.training.stages import PatternError

    try:
        result = loop.train(cfg, _WORKDIR.value, max_steps=_MAX_STEPS.value)
    except loop.NonFiniteLossError as e:
        absl_logging.error("%s", e)
        sys.exit(1)
    except (ConfigError, PatternError, InitFromError, ConversionError, TokenizerError, FileNotFoundError,
            NotADirectoryError) as e:
        _error(str(e))  # the config, init_from or tokenizer: found before any step
    except NoUsableDataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    absl_logging.info("%s at step %d", result.status, result.last_step)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
