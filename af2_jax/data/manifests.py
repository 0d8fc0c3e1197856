"""Dataset manifests -> plain record dicts: the reference's per-dataset JSON files, and a plain JSONL.

A record is `{'id', 'audio' (a path), 'prompt', 'answer', 'start' (s), 'duration' (s or None), 'dataset'}` plus
'skill'/'choices' when the row has them. The accepted field names (aliases) are listed in docs/DATA.md and below.

Several audios per record (docs/ICL.md):
- an interleaved (few-shot) row has lists: `audio`, `prompt`, `answer` (and optionally `start`, `duration`) of the
  same length, the examples first and the target last, plus `interleaved` ('similar' | 'random'); AF1's
  `interleaved_knn-<split>.json` / `interleaved_random-<split>.json` files (indices into the task's train.json and
  split file) are resolved into such records;
- a chat row has `dialogue`: [{"user": q, "assistant": a}, ...] (or [q, a] pairs), one audio path or a list, and
  optionally `audio_turns` (the round each audio is attached to; default round 0).

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


INTERLEAVED_KINDS = ("similar", "random")  # AF1: interleaved_knn -> 'similar', interleaved_random -> 'random'


def _audio_path(where: str, key: str, audio: Any, root: pathlib.Path) -> str:
    if not isinstance(audio, str) or not audio.strip():
        raise ManifestError(f"{where}: {key!r} must be a non-empty string, got {audio!r}")
    path = pathlib.Path(os.path.expanduser(audio))
    return str(path if path.is_absolute() else root / path)


def _per_audio(where: str, key: str | None, value, count: int, *, allow_none: bool) -> list:
    """A per-audio time field of a several-audio row: absent, or a list of `count` numbers (None allowed)."""
    if value is None:
        return [None if allow_none else 0.0] * count
    if not isinstance(value, list) or len(value) != count:
        raise ManifestError(f"{where}: {key!r} must be a list of {count} values (one per audio), got {value!r}")
    return [_seconds(where, key, v, allow_none=allow_none) for v in value]


def _parse_interleaved(row: dict, audio_key: str, audio: list, *, where: str, root: pathlib.Path, dataset: str,
                       default_id: str) -> dict:
    """A row with a list of audios: AF1's few-shot entry (examples first, target last)."""
    count = len(audio)
    if count == 0:
        raise ManifestError(f"{where}: {audio_key!r} is an empty list")
    fields = {}
    for name, keys in (("prompt", PROMPT_KEYS), ("answer", ANSWER_KEYS)):
        key, value = _pick(row, keys)
        if not isinstance(value, list) or len(value) != count or not all(isinstance(v, str) for v in value):
            raise ManifestError(f"{where}: {audio_key!r} is a list of {count} audios (an interleaved entry), so "
                                f"the {name} ({'/'.join(keys)}) must be a list of {count} strings, got {value!r}")
        fields[name] = value
    if any(not a.strip() for a in fields["answer"]):
        raise ManifestError(f"{where}: an answer of the interleaved entry is empty (nothing to learn or score)")
    start_key, start = _pick(row, START_KEYS)
    duration_key, duration = _pick(row, DURATION_KEYS)
    kind = row.get("interleaved", "similar")
    if kind not in INTERLEAVED_KINDS:
        raise ManifestError(f"{where}: 'interleaved' must be one of {INTERLEAVED_KINDS}, got {kind!r}")
    _, row_id = _pick(row, ID_KEYS)
    paths = [_audio_path(f"{where} audio {i}", audio_key, a, root) for i, a in enumerate(audio)]
    record = {"id": str(row_id) if row_id is not None else default_id, "audio": paths, **fields,
              "start": _per_audio(where, start_key, start, count, allow_none=False),
              "duration": _per_audio(where, duration_key, duration, count, allow_none=True),
              "dataset": dataset, "interleaved": kind}
    if count == 1:  # only a target: the plain single-audio record
        record.pop("interleaved")
        return dict(record, audio=paths[0], prompt=fields["prompt"][0], answer=fields["answer"][0],
                    start=record["start"][0], duration=record["duration"][0])
    if isinstance(row.get("task"), str) and row["task"].strip():
        record["task"] = row["task"]
    return record


def _parse_dialogue(row: dict, *, where: str, root: pathlib.Path, dataset: str, default_id: str) -> dict:
    """A chat row: one audio (or a list) and its dialogue rounds."""
    dialogue = row["dialogue"]
    if not isinstance(dialogue, list) or not dialogue:
        raise ManifestError(f"{where}: 'dialogue' must be a non-empty list of rounds")
    rounds = []
    for number, turn in enumerate(dialogue):
        if isinstance(turn, dict):
            turn = (turn.get("user"), turn.get("assistant"))
        if (not isinstance(turn, (list, tuple)) or len(turn) != 2
                or not all(isinstance(t, str) and t.strip() for t in turn)):
            raise ManifestError(f"{where}: dialogue round {number} must be {{'user': text, 'assistant': text}} "
                                f"(both non-empty), got {dialogue[number]!r}")
        rounds.append([turn[0], turn[1]])
    audio_key, audio = _pick(row, AUDIO_KEYS)
    if audio is None:
        raise ManifestError(f"{where}: no audio path (looked for {', '.join(AUDIO_KEYS)})")
    single = not isinstance(audio, list)
    audios = [audio] if single else audio
    if not audios:
        raise ManifestError(f"{where}: {audio_key!r} is an empty list")
    turns = row.get("audio_turns", [0] * len(audios))
    if (not isinstance(turns, list) or len(turns) != len(audios)
            or not all(isinstance(t, int) and 0 <= t < len(rounds) for t in turns)):
        raise ManifestError(f"{where}: 'audio_turns' must list, for each of the {len(audios)} audios, the round "
                            f"(0..{len(rounds) - 1}) it is attached to; got {turns!r}")
    if turns != sorted(turns):
        raise ManifestError(f"{where}: 'audio_turns' must be in audio order (non-decreasing), got {turns!r}")
    start_key, start = _pick(row, START_KEYS)
    duration_key, duration = _pick(row, DURATION_KEYS)
    paths = [_audio_path(f"{where} audio {i}", audio_key, a, root) for i, a in enumerate(audios)]
    _, row_id = _pick(row, ID_KEYS)
    record = {"id": str(row_id) if row_id is not None else default_id, "dialogue": rounds, "dataset": dataset,
              "audio_turns": list(turns)}
    if single:
        record.update(audio=paths[0], start=_seconds(where, start_key, start, allow_none=False),
                      duration=_seconds(where, duration_key, duration, allow_none=True))
    else:
        record.update(audio=paths, start=_per_audio(where, start_key, start, len(paths), allow_none=False),
                      duration=_per_audio(where, duration_key, duration, len(paths), allow_none=True))
    return record


def parse_row(row: Any, *, where: str, root: pathlib.Path, dataset: str, default_id: str) -> dict:
    """One manifest row -> a record; raises ManifestError naming `where` (file and row) and the problem."""
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected an object, got {type(row).__name__}")
    if "dialogue" in row:
        return _parse_dialogue(row, where=where, root=root, dataset=dataset, default_id=default_id)
    audio_key, audio = _pick(row, AUDIO_KEYS)
    if audio is None:
        raise ManifestError(f"{where}: no audio path (looked for {', '.join(AUDIO_KEYS)})")
    if isinstance(audio, list):
        return _parse_interleaved(row, audio_key, audio, where=where, root=root, dataset=dataset,
                                  default_id=default_id)
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


def _data_rows(path: pathlib.Path, content: Any) -> list[tuple[Any, Any]]:
    """(key, row) of an AF2 manifest's "data", in numeric key order (numeric keys numerically)."""
    if not isinstance(content, dict) or "data" not in content:
        raise ManifestError(f"{path}: not an AF2 manifest (expected an object with a 'data' field)")
    data = content["data"]
    if isinstance(data, dict):
        keys = sorted(data, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))
        return [(k, data[k]) for k in keys]
    if isinstance(data, list):
        return list(enumerate(data))
    raise ManifestError(f"{path}: 'data' must be an object or a list, got {type(data).__name__}")


def _audio_root(path: pathlib.Path, content: dict, audio_root) -> pathlib.Path:
    return pathlib.Path(audio_root or content.get("dataset_path") or path.parent) / (content.get("split_path") or "")


def read_af2_manifest(path, *, audio_root=None, dataset: str | None = None, strict: bool = True) -> list[dict]:
    """The reference's dataset JSON -> records, in the order of its "data" keys (numeric keys numerically). AF1's
    interleaved files (an "interleaved_data" field) are resolved by `read_interleaved_manifest`."""
    path = pathlib.Path(path)
    content = _load_json(path)
    if isinstance(content, dict) and "interleaved_data" in content:
        return read_interleaved_manifest(path, audio_root=audio_root, dataset=dataset, strict=strict,
                                         content=content)
    rows = _data_rows(path, content)
    if dataset is None:
        dataset = str(content.get("flamingo_task") or path.parent.name or path.stem)
    return _collect(rows, where_prefix=f"{path}: entry", root=_audio_root(path, content, audio_root),
                    dataset=dataset, strict=strict)


def read_interleaved_manifest(path, *, audio_root=None, dataset: str | None = None, strict: bool = True,
                              content: Any = None) -> list[dict]:
    """AF1's `interleaved_knn-<split>.json` (or `interleaved_random-`) -> several-audio records.

    {"split": "test", "flamingo_task": ..., "interleaved_data": {"0": {"generation_index_in_split": i,
    "fewshot_indices_in_train": [j1, ...]}}}: the target is entry i of the task's `<split>.json` beside it, the
    examples entries j of its `train.json` (each read with its own file's dataset_path / split_path), examples
    first. 'interleaved' is 'similar' for knn files, 'random' for random ones."""
    path = pathlib.Path(path)
    content = _load_json(path) if content is None else content
    entries = content.get("interleaved_data") if isinstance(content, dict) else None
    if isinstance(entries, list):
        entries = dict(enumerate(entries))
    if not isinstance(entries, dict):
        raise ManifestError(f"{path}: 'interleaved_data' must be an object of entries")
    stem = path.stem
    kind = "random" if stem.startswith("interleaved_random") else "similar"
    split = content.get("split") or (stem.split("-", 1)[1] if "-" in stem else None)
    if not split:
        raise ManifestError(f"{path}: no 'split' (and none in the file name interleaved_<mode>-<split>.json)")
    if dataset is None:
        dataset = str(content.get("flamingo_task") or path.parent.name)
    tables = {}
    for name in ("train", str(split)):
        file = path.parent / f"{name}.json"
        base = _load_json(file)
        tables[name] = (file, _audio_root(file, base, audio_root), {str(k): row for k, row in _data_rows(file, base)})

    def resolve(name: str, index: Any, where: str) -> dict:
        file, root, rows = tables[name]
        if str(index) not in rows:
            raise ManifestError(f"{where}: index {index!r} is not an entry of {file}")
        return parse_row(rows[str(index)], where=f"{file}: entry {index}", root=root, dataset=dataset,
                         default_id=f"{dataset}-{index}")

    records, errors = [], []
    keys = sorted(entries, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))
    for key in keys:
        where = f"{path}: entry {key}"
        try:
            entry = entries[key]
            if not isinstance(entry, dict) or "generation_index_in_split" not in entry or not isinstance(
                    entry.get("fewshot_indices_in_train"), list):
                raise ManifestError(f"{where}: needs 'generation_index_in_split' and a list "
                                    f"'fewshot_indices_in_train'")
            items = [resolve("train", j, where) for j in entry["fewshot_indices_in_train"]]
            items.append(resolve(str(split), entry["generation_index_in_split"], where))
            if any(isinstance(item["audio"], list) or "dialogue" in item for item in items):
                raise ManifestError(f"{where}: refers to an entry that is not a single-audio question")
            record = {"id": f"{dataset}-{kind}-{split}-{key}", "dataset": dataset, "interleaved": kind,
                      **{field: [item[field] for item in items]
                         for field in ("audio", "prompt", "answer", "start", "duration")}}
            if len(items) == 1:
                record = dict(items[0], id=record["id"])
            records.append(record)
        except ManifestError as error:
            if strict:
                raise
            errors.append(str(error))
    if errors:
        logging.warning("skipped %d bad interleaved entries of %s; first: %s", len(errors), path, errors[:3])
    return records


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
    """Write path-based records as JSONL (waveform records cannot be written: pack them with tfds_builder);
    interleaved and chat records keep their lists and dialogue, so `read_jsonl` gives them back."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            if "audio" not in record:
                raise ManifestError(f"record {record.get('id')!r} has no audio path to write")
            row = {k: record[k] for k in ("id", "audio", "prompt", "answer", "start", "duration", "interleaved",
                                          "task", "dialogue", "audio_turns") if k in record}
            f.write(json.dumps(row) + "\n")


def _load_json(path: pathlib.Path):
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from None
