"""Where training metrics go: a progress line on the console (with ETA), TensorBoard event files and a JSONL file
in the workdir (one object per step; the evaluation/plot tools read it). Only process 0 writes."""
from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Mapping

METRICS_FILE = "metrics.jsonl"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    def __init__(self, workdir: str | pathlib.Path, total_steps: int, *, log_every: int = 10, enabled: bool = True):
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if enabled:
            workdir = pathlib.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(workdir / METRICS_FILE, "a", buffering=1)
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(str(workdir / "tensorboard"))
        self._last_time: float | None = None
        self._step_times: list[float] = []

    def write(self, step: int, metrics: Mapping[str, float]) -> dict:
        """`metrics` of the step that produced checkpoint step `step` (1-based); adds step time and tokens/s."""
        now = time.perf_counter()
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if self._last_time is not None:
            step_time = now - self._last_time
            self._step_times = (self._step_times + [step_time])[-50:]
            record["step_time_s"] = step_time
            record["tokens_per_s"] = record.get("tokens", 0.0) / step_time if step_time > 0 else 0.0
        self._last_time = now
        record["time"] = time.time()
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "time"):
                self._writer.add_scalar(f"train/{key}", value, step)
        if step % self.log_every == 0 or step == self.total_steps:
            logging.info(self.progress_line(record))
        return record

    def progress_line(self, record: Mapping[str, float]) -> str:
        step = int(record["step"])
        mean_time = sum(self._step_times) / len(self._step_times) if self._step_times else float("nan")
        eta = (self.total_steps - step) * mean_time
        parts = [f"step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f}%)",
                 f"loss {record['loss']:.4f}", f"lr {record['learning_rate']:.2e}",
                 f"grad_norm {record['grad_norm']:.3f}"]
        if "step_time_s" in record:
            parts += [f"{record['tokens_per_s']:.0f} tok/s", f"{record['step_time_s']:.3f} s/step"]
        parts.append(f"ETA {_duration(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
