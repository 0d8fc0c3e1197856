"""What `launch/infer.py` is asked: (audio file, question) items from the command line or a manifest, and each
file turned into AF2 windows (the reference reads at most max_windows x 10 s from the start; longer audio is
cropped with a warning). Errors name the file or manifest line, so one bad item never stops the others."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings

import numpy as np

from af2_jax.audio.windows import WINDOW_SAMPLES, SAMPLE_RATE, make_windows

AUDIO_KEYS = ("audio", "audio_path", "path", "name", "file", "wav")
PROMPT_KEYS = ("prompt", "question", "instruction", "query")


class RequestError(ValueError):
    """A manifest or item that cannot be used; the message names where and why."""


@dataclasses.dataclass
class Item:
    id: str
    audio: str
    prompt: str


def _pick(row: dict, keys: tuple[str, ...]):
    return next((row[k] for k in keys if isinstance(row.get(k), str) and row[k].strip()), None)


def read_items(path) -> list[Item]:
    """A JSONL file (one object per line), a JSON list of objects, or an AF2 manifest ({"data": {...}}); each object
    has an audio path (audio/path/name/...) and a question (prompt/question/...). Relative audio paths are relative
    to the manifest's folder (AF2 manifests: dataset_path/split_path)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise RequestError(f"{path}: manifest not found")
    text = path.read_text(encoding="utf-8")
    root = path.parent
    rows: list[tuple[str, object]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise RequestError(f"{path}: line {number}: invalid JSON ({e.msg})") from None
    else:
        try:
            content = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        if isinstance(content, dict) and "data" in content:
            root = pathlib.Path(content.get("dataset_path") or root) / (content.get("split_path") or "")
            data = content["data"]
            rows = [(f"entry {k}", v) for k, v in (data.items() if isinstance(data, dict) else enumerate(data))]
        elif isinstance(content, list):
            rows = [(f"entry {i}", v) for i, v in enumerate(content)]
        else:
            raise RequestError(f"{path}: expected a JSON list of objects, JSONL, or an AF2 manifest with 'data'")
    items = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise RequestError(f"{path}: {where}: expected an object, got {type(row).__name__}")
        audio, prompt = _pick(row, AUDIO_KEYS), _pick(row, PROMPT_KEYS)
        if audio is None or prompt is None:
            raise RequestError(f"{path}: {where}: needs an audio path ({'/'.join(AUDIO_KEYS)}) and a question "
                               f"({'/'.join(PROMPT_KEYS)})")
        audio_path = pathlib.Path(os.path.expanduser(audio))
        row_id = row.get("id", where.split()[-1])
        items.append(Item(str(row_id), str(audio_path if audio_path.is_absolute() else root / audio_path), prompt))
    return items


def load_windows(path: str, max_windows: int) -> np.ndarray:
    """The file as (n <= max_windows, 160000) windows; audio past max_windows x 10 s is cropped with a warning.

    Raises af2_jax.audio.io.AudioError naming the file when it cannot be read."""
    import soundfile

    from af2_jax.audio.io import AudioError, load_audio

    limit = max_windows * WINDOW_SAMPLES / SAMPLE_RATE
    try:
        seconds = soundfile.info(path).duration
    except Exception:  # load_audio below reports unreadable files by name
        seconds = None
    if seconds is not None and seconds > limit:
        warnings.warn(f"{path}: audio is {seconds:.1f} s; only the first {limit:.0f} s ({max_windows} windows) are "
                      f"used (raise --max-windows to hear more)", stacklevel=2)
    wave = load_audio(path, duration=limit)  # the reference's read: at most `limit` seconds from the start
    if wave.size == 0:
        raise AudioError(path, "no audio samples")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already warned above
        return make_windows(wave, max_windows, name=path)
