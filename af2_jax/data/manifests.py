"""Dataset manifests -> plain record dicts: the reference's per-dataset JSON files, and a plain JSONL.

A record is `{'id', 'audio' (a path), 'prompt', 'answer', 'start' (s), 'duration' (s or None), 'dataset'}` plus
'skill'/'choices' when the row has them. The accepted field names (aliases) are listed in docs/DATA.md and below.

The reference's format (AF2 `audio_flamingo_2/README.md`, `data/prepare_each_dataset.py`), one file per
`Name-Task/split.json`:
    {"dataset_path": root (optional), "split": "train", "split_path": "audio/train", "flamingo_task": "Name-Task",
     "total_num": N, "data": {"0": {"name": "x.wav", "prompt": "...", "output": "...", "duration": 10.0}, ...}}
An entry's audio is `<root>/<split_path>/<name>` where root is `audio_root`, else "dataset_path", else the
manifest's folder; absolute names are used as they are.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from typing import Any

AUDIO_KEYS = ("name", "audio", "audio_path", "path", "file", "filename", "wav")
PROMPT_KEYS = ("prompt", "question", "instruction", "query")
ANSWER_KEYS = ("output", "answer", "response", "caption", "text")
START_KEYS = ("audio_start", "start", "start_time", "offset")
DURATION_KEYS = ("duration", "audio_duration", "audio_length_seconds")
ID_KEYS = ("id", "key", "uid")


class ManifestError(ValueError):
    """A manifest file or row that cannot be used; the message names the file, the row and the problem."""


def _pick(row: dict, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if key in row and row[key] is not None:
            return key, row[key]
    return None, None


def _seconds(where: str, key: str | None, value, *, allow_none: bool) -> float | None:
    if value is None:
        return None if allow_none else 0.0
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: {key!r} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0 or (key in DURATION_KEYS and seconds == 0):
        raise ManifestError(f"{where}: {key!r} must be a finite {'positive' if key in DURATION_KEYS else 'non-negative'} "
                            f"number of seconds, got {value!r}")
    return seconds


def parse_row(row: Any, *, where: str, root: pathlib.Path, dataset: str, default_id: str) -> dict:
    """One manifest row -> a record; raises ManifestError naming `where` (file and row) and the problem."""
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected an object, got {type(row).__name__}")
    audio_key, audio = _pick(row, AUDIO_KEYS)
    if audio is None:
        raise ManifestError(f"{where}: no audio path (looked for {', '.join(AUDIO_KEYS)})")
    if isinstance(audio, list):
        raise ManifestError(f"{where}: {audio_key!r} is a list (interleaved few-shot entries are not supported)")
    if not isinstance(audio, str) or not audio.strip():
        raise ManifestError(f"{where}: {audio_key!r} must be a non-empty string, got {audio!r}")
    prompt_key, prompt = _pick(row, PROMPT_KEYS)
    if prompt is None:
        raise ManifestError(f"{where}: no prompt (looked for {', '.join(PROMPT_KEYS)})")
    answer_key, answer = _pick(row, ANSWER_KEYS)
    if answer is None:
        raise ManifestError(f"{where}: no answer (looked for {', '.join(ANSWER_KEYS)})")
    for key, value in ((prompt_key, prompt), (answer_key, answer)):
        if not isinstance(value, str):
            raise ManifestError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not answer.strip():
        raise ManifestError(f"{where}: {answer_key!r} is empty (nothing to learn or score)")
    start_key, start = _pick(row, START_KEYS)
    duration_key, duration = _pick(row, DURATION_KEYS)
    _, row_id = _pick(row, ID_KEYS)
    path = pathlib.Path(os.path.expanduser(audio))
    record = {
        "id": str(row_id) if row_id is not None else default_id,
        "audio": str(path if path.is_absolute() else root / path),
        "prompt": prompt,
        "answer": answer,
        "start": _seconds(where, start_key, start, allow_none=False),
        "duration": _seconds(where, duration_key, duration, allow_none=True),
        "dataset": dataset,
    }
    for extra in ("skill", "choices"):
        if extra in row:
            record[extra] = row[extra]
    return record


def _collect(rows, *, where_prefix: str, root, dataset: str, strict: bool) -> list[dict]:
    records, errors = [], []
    for key, row in rows:
        try:
            records.append(parse_row(row, where=f"{where_prefix} {key}", root=root, dataset=dataset,
                                     default_id=f"{dataset}-{key}"))
        except ManifestError as error:
            if strict:
                raise
            errors.append(str(error))
    if errors:
        logging.warning("skipped %d bad manifest rows of %s; first: %s", len(errors), where_prefix, errors[:3])
    return records


def read_af2_manifest(path, *, audio_root=None, dataset: str | None = None, strict: bool = True) -> list[dict]:
    """The reference's dataset JSON -> records, in the order of its "data" keys (numeric keys numerically)."""
    path = pathlib.Path(path)
    content = _load_json(path)
    if not isinstance(content, dict) or "data" not in content:
        raise ManifestError(f"{path}: not an AF2 manifest (expected an object with a 'data' field)")
    data = content["data"]
    if isinstance(data, dict):
        keys = sorted(data, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))
        rows = [(k, data[k]) for k in keys]
    elif isinstance(data, list):
        rows = list(enumerate(data))
    else:
        raise ManifestError(f"{path}: 'data' must be an object or a list, got {type(data).__name__}")
    root = pathlib.Path(audio_root or content.get("dataset_path") or path.parent)
    split_path = content.get("split_path") or ""
    if dataset is None:
        dataset = str(content.get("flamingo_task") or path.parent.name or path.stem)
    return _collect(rows, where_prefix=f"{path}: entry", root=root / split_path, dataset=dataset, strict=strict)


def read_jsonl(path, *, audio_root=None, dataset: str | None = None, strict: bool = True) -> list[dict]:
    """One JSON object per line ({audio, prompt, answer, start?, duration?, id?}); blank lines are ignored."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                if strict:
                    raise ManifestError(f"{path}: line {number}: invalid JSON ({error.msg})") from None
                logging.warning("%s: line %d: invalid JSON (%s); skipped", path, number, error.msg)
    root = pathlib.Path(audio_root or path.parent)
    return _collect(rows, where_prefix=f"{path}: line", root=root, dataset=dataset or path.stem, strict=strict)


def read_manifest(path, **kwargs) -> list[dict]:
    """`.jsonl` -> read_jsonl, anything else -> read_af2_manifest."""
    if str(path).endswith(".jsonl"):
        return read_jsonl(path, **kwargs)
    return read_af2_manifest(path, **kwargs)


def write_jsonl(records, path) -> None:
    """Write path-based records as JSONL (waveform records cannot be written: pack them with tfds_builder)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            if "audio" not in record:
                raise ManifestError(f"record {record.get('id')!r} has no audio path to write")
            row = {k: record[k] for k in ("id", "audio", "prompt", "answer", "start", "duration") if k in record}
            f.write(json.dumps(row) + "\n")


def _load_json(path: pathlib.Path):
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from None
