"""Caption manifests for AF-CLAP training -> plain records {'id', 'audio' (path), 'captions' [str, ...],
'negatives' [str, ...], 'start' (s), 'duration' (s or None), 'dataset'}.

Accepted (docs/CLAP_DATA.md):
  JSONL          one object per line: {"audio": "a.flac", "caption": "..." | "captions": [...], "negatives": [...],
                 "start": 0.0, "duration": 10.0}
  JSON           a list of such objects, or AF2's dataset JSON ({"dataset_path", "split_path", "data": {...} | [...]})
  a folder       LAION's webdataset layout unpacked: <key>.json beside <key>.flac (or .wav/.mp3/.ogg); the JSON's
                 'text' is a string or a list (LAION samples one per step; here each is a positive)
The field names are af2_jax.data.manifests' (audio, start, duration, id) plus the caption and negative names below.
With caption_format='compa' every caption string is CompA's "positive;negative 1;negative 2" form. Audio is not
opened here: an unreadable file is skipped and counted by the pipeline.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

from af2_jax.data import manifests
from af2_jax.data.manifests import ManifestError

CAPTION_KEYS = ("captions", "caption", "text", "texts", "output", "answer")
NEGATIVE_KEYS = ("negatives", "negative_captions", "hard_negatives", "negative")
CAPTION_FORMATS = ("plain", "compa")
AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg")  # a webdataset key's audio, in the order looked for


def _texts(where: str, key: str, value, *, allow_empty: bool) -> list[str]:
    """A caption field (a string or a list of strings) -> its non-empty, stripped strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ManifestError(f"{where}: {key!r} must be a string or a list of strings, got {type(value).__name__}")
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, str):
            raise ManifestError(f"{where}: {key!r}[{k}] must be a string, got {type(item).__name__}")
        if not item.strip():
            raise ManifestError(f"{where}: {key!r}[{k}] is an empty caption")
        out.append(item.strip())
    if not out and not allow_empty:
        raise ManifestError(f"{where}: {key!r} holds no caption")
    return out


def _split_compa(where: str, key: str, texts: list[str]) -> tuple[list[str], list[str]]:
    """CompA's "pos;neg1;neg2": the first part is the caption, the rest its negatives."""
    positives, negatives = [], []
    for text in texts:
        parts = [p.strip() for p in text.split(";")]
        if any(not p for p in parts):
            raise ManifestError(f"{where}: {key!r} {text!r} has an empty part (CompA form is 'pos;neg1;neg2')")
        positives.append(parts[0])
        negatives.extend(parts[1:])
    return positives, negatives


def parse_caption_row(row: Any, *, where: str, root: pathlib.Path, dataset: str, default_id: str,
                      caption_format: str = "plain") -> dict:
    """One manifest row -> a caption record; raises ManifestError naming `where` and the problem."""
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected an object, got {type(row).__name__}")
    audio_key, audio = manifests._pick(row, manifests.AUDIO_KEYS)
    if audio is None:
        raise ManifestError(f"{where}: no audio path (looked for {', '.join(manifests.AUDIO_KEYS)})")
    if not isinstance(audio, str) or not audio.strip():
        raise ManifestError(f"{where}: {audio_key!r} must be a non-empty string, got {audio!r}")
    caption_key, caption = manifests._pick(row, CAPTION_KEYS)
    if caption is None:
        raise ManifestError(f"{where}: no caption (looked for {', '.join(CAPTION_KEYS)})")
    captions = _texts(where, caption_key, caption, allow_empty=False)
    negatives = []
    if caption_format == "compa":
        captions, negatives = _split_compa(where, caption_key, captions)
    negative_key, negative = manifests._pick(row, NEGATIVE_KEYS)
    if negative is not None:
        found = _texts(where, negative_key, negative, allow_empty=True)
        if caption_format == "compa":  # every part of a negative string is a negative
            found = [p for text in found for part in _split_compa(where, negative_key, [text]) for p in part]
        negatives.extend(found)
    start_key, start = manifests._pick(row, manifests.START_KEYS)
    duration_key, duration = manifests._pick(row, manifests.DURATION_KEYS)
    _, row_id = manifests._pick(row, manifests.ID_KEYS)
    path = pathlib.Path(os.path.expanduser(audio))
    return {
        "id": str(row_id) if row_id is not None else default_id,
        "audio": str(path if path.is_absolute() else root / path),
        "captions": captions,
        "negatives": negatives,
        "start": manifests._seconds(where, start_key, start, allow_none=False),
        "duration": manifests._seconds(where, duration_key, duration, allow_none=True),
        "dataset": dataset,
    }


def _collect(rows, *, where_prefix: str, root, dataset: str, strict: bool, caption_format: str) -> list[dict]:
    records, errors = [], []
    for key, row, where in rows:
        try:
            records.append(parse_caption_row(row, where=where or f"{where_prefix} {key}", root=root, dataset=dataset,
                                             default_id=f"{dataset}-{key}", caption_format=caption_format))
        except ManifestError as error:
            if strict:
                raise
            errors.append(str(error))
    if errors:
        logging.warning("skipped %d bad caption rows of %s; first: %s", len(errors), where_prefix, errors[:3])
    if caption_format == "plain":
        with_semicolons = sum(any(";" in c for c in r["captions"]) for r in records)
        if records and with_semicolons > len(records) // 2:
            logging.warning("%s: %d of %d rows have ';' in their captions; if they are CompA's 'pos;neg1;neg2' "
                            "strings, set caption_format='compa'", where_prefix, with_semicolons, len(records))
    return records


def read_caption_manifest(path, *, audio_root=None, dataset: str | None = None, strict: bool = True,
                          caption_format: str = "plain") -> list[dict]:
    """A caption JSONL (`.jsonl`), JSON (a list, or AF2's dataset JSON) or a folder of LAION webdataset pairs ->
    records. Relative audio paths are relative to `audio_root`, else the JSON's dataset_path/split_path, else the
    manifest's folder. `strict`: a bad row raises ManifestError naming the file and line/entry; otherwise it is
    logged and left out."""
    if caption_format not in CAPTION_FORMATS:
        raise ValueError(f"caption_format must be one of {CAPTION_FORMATS}, got {caption_format!r}")
    path = pathlib.Path(path)
    common = {"strict": strict, "caption_format": caption_format}
    if path.is_dir():
        return _read_webdataset_folder(path, audio_root=audio_root, dataset=dataset or path.name, **common)
    if not path.is_file():
        raise ManifestError(f"{path}: caption manifest not found")
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((number, json.loads(line), None))
                except json.JSONDecodeError as error:
                    if strict:
                        raise ManifestError(f"{path}: line {number}: invalid JSON ({error.msg})") from None
                    logging.warning("%s: line %d: invalid JSON (%s); skipped", path, number, error.msg)
        root = pathlib.Path(audio_root or path.parent)
        return _collect(rows, where_prefix=f"{path}: line", root=root, dataset=dataset or path.stem, **common)
    content = manifests._load_json(path)
    if isinstance(content, list):
        rows = [(k, row, None) for k, row in enumerate(content)]
        root, name = pathlib.Path(audio_root or path.parent), path.stem
    elif isinstance(content, dict) and "data" in content:
        data = content["data"]
        if isinstance(data, dict):
            keys = sorted(data, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))
            rows = [(k, data[k], None) for k in keys]
        elif isinstance(data, list):
            rows = [(k, row, None) for k, row in enumerate(data)]
        else:
            raise ManifestError(f"{path}: 'data' must be an object or a list, got {type(data).__name__}")
        root = pathlib.Path(audio_root or content.get("dataset_path") or path.parent)
        root = root / (content.get("split_path") or "")
        name = str(content.get("flamingo_task") or path.stem)
    else:
        raise ManifestError(f"{path}: expected a list of caption objects or an object with a 'data' field")
    return _collect(rows, where_prefix=f"{path}: entry", root=root, dataset=dataset or name, **common)


def _read_webdataset_folder(folder: pathlib.Path, *, audio_root, dataset: str, strict: bool,
                            caption_format: str) -> list[dict]:
    """<key>.json + <key>.<audio> pairs (LAION's shard members, unpacked), keys in sorted order."""
    rows = []
    for file in sorted(folder.glob("*.json")):
        if file.name == "sizes.json":  # LAION's shard-size table, not a sample
            continue
        where = f"{file}"
        try:
            content = manifests._load_json(file)
            if not isinstance(content, dict):
                raise ManifestError(f"{where}: expected an object, got {type(content).__name__}")
            audio = next((file.with_suffix(s) for s in AUDIO_SUFFIXES if file.with_suffix(s).exists()), None)
            if audio is None and manifests._pick(content, manifests.AUDIO_KEYS)[1] is None:
                raise ManifestError(f"{where}: no audio beside it ({'/'.join(AUDIO_SUFFIXES)}) and no audio field")
        except ManifestError as error:
            if strict:
                raise
            logging.warning("skipped %s", error)
            continue
        row = dict(content)
        if audio is not None:
            row = {**{k: v for k, v in row.items() if k not in manifests.AUDIO_KEYS}, "audio": str(audio)}
        row.setdefault("id", file.stem)
        rows.append((file.stem, row, where))
    if not rows and strict:
        raise ManifestError(f"{folder}: no <key>.json caption files")
    return _collect(rows, where_prefix=str(folder), root=pathlib.Path(audio_root or folder), dataset=dataset,
                    strict=strict, caption_format=caption_format)


def write_caption_jsonl(records, path) -> None:
    """Write path-based caption records as JSONL (the format read_caption_manifest reads back)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            if "audio" not in record:
                raise ManifestError(f"record {record.get('id')!r} has no audio path to write")
            row = {k: record[k] for k in ("id", "audio", "captions", "negatives", "start", "duration") if k in record}
            f.write(json.dumps(row) + "\n")
