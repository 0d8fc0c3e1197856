"""How evaluation results are shown and stored: a per-task console table and one JSON file.

The JSON file (schema SCHEMA) holds everything needed to recompute the metrics: every prediction with its prompt,
reference and options, the per-task summaries, and how the predictions were generated.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

SCHEMA = "af2-jax-eval/1"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(tasks: Mapping[str, Mapping[str, Any]], overall: Mapping[str, Any]) -> str:
    """A fixed-width table: task, n, accuracy % next to chance %, exact match %, token F1, CIDEr-D."""
    header = ("task", "n", "acc %", "chance %", "no-opt %", "exact %", "F1", "CIDEr-D")
    rows = [
        (task, str(s["count"]), _percent(s["accuracy"]), _percent(s["chance"]), _percent(s["no_option_rate"]),
         _percent(s["exact_match"]), _number(s["token_f1"]), _number(s["cider_d"]))
        for task, s in tasks.items()
    ]
    rows.append(
        ("all", str(overall["count"]), _percent(overall["accuracy"]), _percent(overall["chance"]),
         _percent(overall["no_option_rate"]), _percent(overall["exact_match"]), _number(overall["token_f1"]), "-")
    )
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    lines = [line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])]
    if overall.get("macro_accuracy") is not None:
        lines.append(f"macro accuracy over tasks: {_percent(overall['macro_accuracy'])} %")
    return "\n".join(lines)


def write_json(path, payload: Mapping[str, Any]) -> pathlib.Path:
    """Write `payload` (plus the schema tag) as indented JSON, creating parent directories."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, **payload}, indent=2, sort_keys=False) + "\n")
    return path


def read_json(path) -> dict[str, Any]:
    """Read a results file, refusing one written under another schema."""
    payload = json.loads(pathlib.Path(path).read_text())
    if payload.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {payload.get('schema')!r}, expected {SCHEMA!r}")
    return payload
