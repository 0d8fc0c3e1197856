"""Training curves of a curriculum: each stage's loss per step, read from its workdir's metrics JSONL, drawn one
after the other on a shared step axis as a PNG (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Mapping, Sequence


def read_metrics(path) -> list[dict]:
    """The step records of a metrics JSONL, sorted by step; a resumed run's repeated steps keep their last record,
    and a torn last line (a run killed mid-write) is skipped."""
    by_step: dict[int, dict] = {}
    lines = pathlib.Path(path).read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logging.warning("%s: last line is incomplete; ignored", path)
                continue
            raise ValueError(f"{path}: line {number} is not JSON") from None
        by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def stage_offsets(stages: Mapping[str, Sequence[dict]]) -> dict[str, int]:
    """Where each stage's step 1 sits on the shared axis: after the last step of all stages before it."""
    offsets, total = {}, 0
    for name, records in stages.items():
        offsets[name] = total
        total += max((int(r["step"]) for r in records), default=0)
    return offsets


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and up to `window - 1` values before it."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_curves(stages: Mapping[str, Sequence[dict]], output, *, key: str = "loss",
                         title: str = "training loss") -> pathlib.Path:
    """Draw `key` against the shared step axis for every stage (in the mapping's order) into the PNG `output`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offsets = stage_offsets(stages)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, records in stages.items():
        points = [(offsets[name] + int(r["step"]), float(r[key])) for r in records if key in r]
        if points:
            steps, values = zip(*points)
            line, = ax.plot(steps, values, label=name, linewidth=1.0, alpha=0.4 if len(values) >= 40 else 1.0)
            if len(values) >= 40:  # per-batch loss is noisy: draw its trailing mean over it in the same colour
                ax.plot(steps, trailing_mean(values, len(values) // 20), color=line.get_color(), linewidth=1.6)
        if offsets[name] > 0:  # stage boundary
            ax.axvline(offsets[name], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step (stages one after the other)")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(stages.values()):
        ax.legend()
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output, format="png")
    plt.close(fig)
    return output
