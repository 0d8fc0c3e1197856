"""One record -> one model example: audio decoded, resampled, normalised and cut into windows; text tokenised.

Records come from manifests ('audio': a path), the synthetic generator ('waveform' + 'sample_rate') or ArrayRecord
shards ('audio_int16', the prepared waveform, exact). The audio steps follow the reference (af2_jax.audio.io).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from af2_jax.tokenizer import encode_example

INT16_SCALE = 32767.0


class RecordError(ValueError):
    """A record that cannot become a training example; the message names the record and the problem."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Marker for a record that failed: the pipeline counts and logs it instead of stopping."""
    record_id: str
    reason: str


def load_waveform(record: dict, max_windows: int) -> np.ndarray:
    """The record's prepared mono 16 kHz float32 waveform, at most `max_windows` x 10 s long (reference reads)."""
    from af2_jax.audio import io, windows

    name = str(record.get("id", "<record>"))
    limit_s = max_windows * windows.WINDOW_SAMPLES / windows.SAMPLE_RATE
    start = float(record.get("start") or 0.0)
    duration = record.get("duration")
    duration = limit_s if duration is None else min(float(duration), limit_s)
    if "audio_int16" in record:
        rate = int(record.get("sample_rate", windows.SAMPLE_RATE))
        samples = np.asarray(record["audio_int16"], np.int16)
        samples = samples[: int(round(limit_s * rate))]
        if rate == windows.SAMPLE_RATE:  # stored already prepared: int16 / 32767 is exactly the prepared wave
            if samples.size == 0:
                raise io.AudioError(name, "no audio samples")
            return (samples / INT16_SCALE).astype(np.float32)
        return io.prepare(samples / INT16_SCALE, rate, name=name)
    if "waveform" in record:
        rate = int(record.get("sample_rate", windows.SAMPLE_RATE))
        samples = np.asarray(record["waveform"])
        first = int(round(start * rate))
        samples = samples[first: first + int(round(duration * rate))]
        return io.prepare(samples, rate, name=name)
    if "audio" in record:
        return io.load_audio(record["audio"], start=start, duration=duration)
    raise RecordError(f"{name}: record has no audio ('audio' path, 'waveform' or 'audio_int16')")


def make_example(record: dict, tokenizer, *, max_windows: int, max_tokens: int) -> dict:
    """Record -> {'windows' (n, 160000) float32, 'input_ids' (L,) int32, 'loss_mask' (L,) float32, 'id'}."""
    from af2_jax.audio import windows as audio_windows

    name = str(record.get("id", "<record>"))
    for key in ("prompt", "answer"):
        if not isinstance(record.get(key), str):
            raise RecordError(f"{name}: {key!r} missing or not a string")
    wave = load_waveform(record, max_windows)
    wave = wave[: max_windows * audio_windows.WINDOW_SAMPLES]  # already capped; never let make_windows warn
    ids, mask = encode_example(tokenizer, record["prompt"], record["answer"], max_len=max_tokens)
    if not any(mask):
        raise RecordError(f"{name}: no answer token left within max_tokens={max_tokens} (prompt too long)")
    return {
        "id": name,
        "windows": audio_windows.make_windows(wave, max_windows, name=name),
        "input_ids": np.asarray(ids, np.int32),
        "loss_mask": np.asarray(mask, np.float32),
    }


def make_example_or_skip(record: dict, tokenizer, *, max_windows: int, max_tokens: int):
    """make_example, but any failure becomes a `Skipped` marker (a bad record never stops a run)."""
    try:
        return make_example(record, tokenizer, max_windows=max_windows, max_tokens=max_tokens)
    except Exception as error:  # noqa: BLE001 - any failure of one record must not end training
        return Skipped(str(record.get("id", "<record>")) if isinstance(record, dict) else "<record>",
                       f"{type(error).__name__}: {error}")
