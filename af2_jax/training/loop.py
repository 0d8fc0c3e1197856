"""The training loop of one curriculum stage: build the sharded state (random or `init_from`), resume from the
newest checkpoint with the data iterator at the same position, run jitted steps, log, checkpoint, stop cleanly on
SIGTERM/SIGINT (after a checkpoint) or on a non-finite loss (keeping the last good checkpoint), and at the end
export the model in our pretrained format to `<workdir>/final` for inference and the next stage.

The host never waits on the device inside a step: a step's metrics are read after the next step was dispatched,
except before a checkpoint, whose state must be known finite.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from af2_jax import param_tree, pretrained, sharding
from af2_jax.models import htsat_calibration
from af2_jax.training import (distributed, feature_norm, initialization, optimizer, run_config,
                              step as step_lib, tasks, train_state)
from af2_jax.training.checkpointing import Checkpointer
from af2_jax.training.metrics import MetricsLogger

FINAL_DIR = pretrained.FINAL_DIR
CHECKPOINT_DIR = pretrained.CHECKPOINT_DIR
CALIBRATION_BATCHES = 16  # the first batches that data-dependent calibrations measure


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class RunResult:
    records: list[dict]  # one per step run in this call: {'step', 'loss', 'grad_norm', 'learning_rate', ...}
    last_step: int
    status: str  # 'finished' | 'preempted' | 'stopped' (max_steps reached before num_steps)
    state: Any = None  # the final TrainState (for tests and benchmarks)
    frozen: Any = None  # the frozen variables (nnx.State) the run used
    split: Any = None  # the ModelSplit: split.merge(state['trainable'], state['batch_stats'], frozen) is the model


class StopFlag:
    """Set by SIGTERM / SIGINT (or by a test); the loop checkpoints and returns at the next step boundary."""

    def __init__(self):
        self.event = threading.Event()
        self.signal_name = ""

    def set(self, signum=None, frame=None) -> None:
        self.signal_name = signal.Signals(signum).name if signum else "request"
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()


def _install_signal_handlers(flag: StopFlag):
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, flag.set) for s in (signal.SIGTERM, signal.SIGINT)}


def _stop_everywhere(flag: StopFlag) -> bool:
    """Every process stops at the same step if any received the signal."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def make_mesh(mesh_cfg: Any) -> jax.sharding.Mesh:
    """The ('data', 'fsdp', 'tensor') mesh; with no -1 size and fewer devices than available, the first ones
    (single-device runs and tests)."""
    sizes = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    devices = jax.devices()
    if -1 not in sizes and math.prod(sizes) < len(devices):
        logging.warning("mesh %s uses %d of %d devices", sizes, math.prod(sizes), len(devices))
        devices = devices[:math.prod(sizes)]
    return sharding.make_mesh(*sizes, devices=devices)


def write_run_config(cfg: Any, workdir: pathlib.Path) -> None:
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / pretrained.RUN_CONFIG_FILE).write_text(cfg.to_json_best_effort(indent=2) + "\n")


def train(cfg: Any, workdir: str | pathlib.Path, *, make_iterator: Callable[..., Iterator[dict]] | None = None,
          make_model: Callable[[], Any] | None = None, max_steps: int | None = None,
          stop: StopFlag | None = None) -> RunResult:
    """Runs (or resumes) the stage described by `cfg` in `workdir` up to `cfg.num_steps`.

    `make_iterator(cfg, tokenizer, rows_per_process)` and `make_model()` replace the data pipeline and the model
    (benchmarks, tests). `max_steps` stops after that many steps of this call (a checkpoint is saved first).
    """
    workdir = pathlib.Path(workdir).absolute()
    run_config.validate(cfg)  # a bad field fails here, before anything is created
    if jax.process_index() == 0:
        for line in run_config.header(cfg, workdir):
            logging.info("%s", line)
    task = tasks.task_of(cfg)
    mesh = make_mesh(cfg.mesh)
    tokenizer = task.tokenizer(cfg)
    model_config = None
    if make_model is None:
        model_config = task.model_config(cfg, tokenizer)
        make_model = task.build(model_config, cfg.seed)

    patterns = tuple(cfg.trainable)
    tx = optimizer.make_optimizer(cfg.optimizer, patterns, cfg.num_steps)
    init_params = initialization.read_init_from(cfg.init_from) if cfg.init_from else None
    split, state, frozen, shardings = train_state.create_train_state(
        make_model, patterns, tx, mesh, initialization.DTYPES[cfg.frozen_param_dtype], params=init_params,
        random_frozen_ok=tuple(cfg.random_frozen_ok))

    rows_per_step = cfg.batch_size * cfg.grad_accum_steps
    if rows_per_step % jax.process_count():
        raise run_config.ConfigError(f"batch_size x grad_accum_steps = {rows_per_step} rows is not divisible by "
                         f"{jax.process_count()} processes")
    iterator = (make_iterator or task.iterator)(cfg, tokenizer, rows_per_step // jax.process_count())

    write_run_config(cfg, workdir)
    checkpointer = Checkpointer(workdir / CHECKPOINT_DIR, keep=cfg.checkpoint.keep,
                                save_every=cfg.checkpoint.every_steps, async_save=cfg.checkpoint.async_save)
    restored = checkpointer.restore(state, shardings[0], iterator)
    start_step = 0
    if restored is not None:
        state, start_step = restored
        logging.info("resumed from checkpoint %d in %s", start_step, checkpointer.directory)
    af2 = task.name == "af2"
    calibrate_input = af2 and restored is None and cfg.model.calibrate_input_norm and \
        htsat_calibration.BN0_MEAN not in (init_params or {})
    calibrate_output = af2 and restored is None and cfg.model.calibrate_feature_norm
    if calibrate_input or calibrate_output:  # both measure the same first batches, read once
        batches = _first_batches(cfg, tokenizer, rows_per_step // jax.process_count(), make_iterator)
    if calibrate_input:
        frozen = _calibrated(split, state, frozen, lambda model: _input_norm(model, batches))
    if calibrate_output:
        target = float(cfg.model.calibrate_feature_norm)
        with jax.set_mesh(mesh):
            frozen = _calibrated(split, state, frozen, lambda model: _feature_norm(model, batches, target, workdir))
    elif af2 and restored is not None and cfg.model.calibrate_feature_norm:
        frozen = _restored_feature_norm(split, state, frozen, workdir)

    step_fn = step_lib.jit_train_step(step_lib.make_train_step(
        split, tx, optimizer.learning_rate_schedule(cfg.optimizer, cfg.num_steps), loss=task.loss(cfg, patterns),
        batch_keys=task.batch_keys, after_update=task.after_update, seed=cfg.seed), mesh, shardings, task.batch_keys)

    stop = stop if stop is not None else StopFlag()
    previous_handlers = _install_signal_handlers(stop)
    logger = MetricsLogger(workdir, cfg.num_steps, log_every=cfg.log_every, enabled=jax.process_index() == 0)
    records: list[dict] = []
    end_step = cfg.num_steps if max_steps is None else min(cfg.num_steps, start_step + max_steps)
    status = "finished"
    step = start_step
    pending: tuple[int, Any] | None = None

    def finish_pending():
        nonlocal pending
        if pending is None:
            return
        done_step, device_metrics = pending
        pending = None
        metrics = jax.device_get(device_metrics)
        if not (math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))):
            raise NonFiniteLossError(
                f"non-finite loss {float(metrics['loss'])} / grad norm {float(metrics['grad_norm'])} at step "
                f"{done_step}; stopping without saving. The last good checkpoint is step "
                f"{checkpointer.latest_step()} in {checkpointer.directory}")
        records.append(logger.write(done_step, metrics))

    compiled_shapes: set[tuple] = set()
    try:
        while step < end_step:
            batch = distributed.global_batch(next(iterator), mesh, cfg.grad_accum_steps)
            shape = tuple(tuple(v.shape) for v in batch.values())
            with jax.set_mesh(mesh), _compiling(shape not in compiled_shapes, shape[0]):
                state, device_metrics = step_fn(state, frozen, batch)
            compiled_shapes.add(shape)
            finish_pending()  # the previous step's metrics, while this one runs
            step += 1
            pending = (step, device_metrics)
            check = (jax.process_count() == 1 or step % cfg.checkpoint.preemption_check_every == 0
                     or step == end_step)
            stopping = check and _stop_everywhere(stop)
            if stopping or step == end_step or step % cfg.checkpoint.every_steps == 0:
                finish_pending()  # never checkpoint a non-finite state
                checkpointer.save(step, state, iterator, force=True)
            if stopping:
                status = "preempted"
                logging.warning("%s received: checkpoint %d saved, stopping", stop.signal_name or "stop", step)
                break
        finish_pending()
        if status == "finished" and step < cfg.num_steps:
            status = "stopped"
        checkpointer.wait()
        if status == "finished" and cfg.export_final and model_config is not None:
            export_final(workdir / FINAL_DIR, model_config, split.merge(state["trainable"], state["batch_stats"],
                                                                        frozen), tokenizer)
    finally:
        checkpointer.close()
        logger.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if hasattr(iterator, "close"):
            iterator.close()
    return RunResult(records=records, last_step=step, status=status, state=state, frozen=frozen, split=split)


@contextlib.contextmanager
def _compiling(first_call: bool, shape: tuple, every_s: float = 15.0):
    """Says that the step is compiling on the first call for a batch shape (tens of seconds on CPU, minutes for a
    real preset), and keeps saying it until the call returns."""
    if not first_call or jax.process_index() != 0:
        yield
        return
    logging.info("compiling the train step for batches of %d x %d rows %s ...", shape[0], shape[1],
                 f"of {shape[2]} windows" if len(shape) == 4 else "")
    done = threading.Event()
    start = time.perf_counter()

    def heartbeat():
        while not done.wait(every_s):
            logging.info("  still compiling (%.0f s)", time.perf_counter() - start)
    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        logging.info("  compiled in %.1f s", time.perf_counter() - start)


def _first_batches(cfg: Any, tokenizer: Any, rows: int, make_iterator: Callable | None) -> list[dict]:
    """The run's first batches, for calibrations (a fresh iterator: the training one is not advanced)."""
    iterator = (make_iterator or tasks.task_of(cfg).iterator)(cfg, tokenizer, rows)
    try:
        return [next(iterator) for _ in range(CALIBRATION_BATCHES)]
    finally:
        if hasattr(iterator, "close"):
            iterator.close()


def _all_processes(moments: np.ndarray) -> np.ndarray:
    """Every process reads its own rows; all must hold the statistics of all of them."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        moments = np.sum(multihost_utils.process_allgather(moments), 0)
    return moments


def _calibrated(split: Any, state: Any, frozen: Any, calibrate: Callable) -> Any:
    """Runs `calibrate(model)` (it sets part of HTSAT in place, af2_jax/models/htsat_calibration.py) on the merged
    model and splits it again: updates `state`'s trainable parameters and statistics; returns the new frozen ones."""
    model = split.merge(state["trainable"], state["batch_stats"], frozen)
    calibrate(model)
    _, state["trainable"], state["batch_stats"], frozen = train_state.split_model(model, split.trainable_patterns)
    return frozen


def _input_norm(model: Any, batches: list[dict]) -> None:
    mean, var = htsat_calibration.calibrate_input_norm(model.htsat, batches, combine=_all_processes)
    logging.info("HTSAT input norm from %d batches: mean %.1f..%.1f dB, std %.1f..%.1f dB",
                 len(batches), mean.min(), mean.max(), np.sqrt(var).min(), np.sqrt(var).max())


def _feature_norm(model: Any, batches: list[dict], target_std: float, workdir: pathlib.Path) -> None:
    """A fresh run measures HTSAT's output norm and saves it beside the checkpoints."""
    values = htsat_calibration.standardise_output_norm(model.htsat, batches, target_std, combine=_all_processes)
    if jax.process_index() == 0:
        feature_norm.save(workdir, values)
    logging.info("HTSAT feature norm from %d batches: scale %.2f..%.2f", len(batches), values["scale"].min(),
                 values["scale"].max())


def _restored_feature_norm(split: Any, state: Any, frozen: Any, workdir: pathlib.Path) -> Any:
    """A resumed run reads the saved output norm back when it is frozen (frozen weights are not in the checkpoint;
    trainable ones are, and keep their trained values). Returns the new frozen state."""
    if not (workdir / feature_norm.FILE).is_file():
        raise FileNotFoundError(f"{workdir / feature_norm.FILE} is missing: this checkpoint was trained "
                                "without model.calibrate_feature_norm; resume with it 0, or start afresh")
    if htsat_calibration.NORM[0] not in param_tree.variable_paths(frozen):
        return frozen
    values = feature_norm.load(workdir)
    return _calibrated(split, state, frozen, lambda model: htsat_calibration.set_output_norm(model.htsat, values))


def export_final(directory: pathlib.Path, model_config: Any, model: Any, tokenizer: Any) -> None:
    """The trained model and its tokenizer in our pretrained format (af2_jax.pretrained), loadable by inference,
    evaluation, conversion and the next stage."""
    pretrained.save(directory, model_config, model, tokenizer=tokenizer, overwrite=True)
    logging.info("exported the final model to %s", directory)
