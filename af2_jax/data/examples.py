"""One record -> one model example: audio decoded, resampled, normalised and cut into windows; text tokenised.

Records come from manifests ('audio': a path), the synthetic generator ('waveform' + 'sample_rate') or ArrayRecord
shards ('audio_int16', the prepared waveform, exact). The audio steps follow the reference (af2_jax.audio.io).

Records with several audios (docs/ICL.md) hold lists: an interleaved few-shot record ('prompt' and 'answer' lists,
examples first, the target last; AF1's ICL text) or a chat record ('dialogue' rounds, one audio or a list with
'audio_turns'; AF1's chat text). Their example holds 'audios', a list of (n_i, 160000) windows, instead of
'windows' when more than one clip is left; a record of one clip gives the single-audio example as always.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from af2_jax.tokenizer import PromptTooLongError, encode_chat, encode_example, encode_icl_example

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


AUDIO_FIELDS = ("audio_int16", "waveform", "audio")


def clip_records(record: dict) -> list[dict]:
    """A record's clips, each as a single-audio record `load_waveform` reads: one for a plain record, one per
    element of its 'audio' / 'waveform' / 'audio_int16' list (with the matching 'start' / 'duration' elements)."""
    name = str(record.get("id", "<record>"))
    field = next((f for f in AUDIO_FIELDS if f in record), None)
    value = record.get(field)
    several = isinstance(value, (list, tuple)) and (field == "audio" or (len(value) > 0 and np.ndim(value[0]) >= 1))
    if not several:
        return [record]
    if not value:
        raise RecordError(f"{name}: {field!r} is an empty list")
    clips = []
    for i, clip in enumerate(value):
        one = {"id": f"{name}[{i}]", field: clip}
        if "sample_rate" in record:
            one["sample_rate"] = record["sample_rate"]
        for key in ("start", "duration"):
            times = record.get(key)
            if isinstance(times, (list, tuple)):
                if len(times) != len(value):
                    raise RecordError(f"{name}: {key!r} has {len(times)} values for {len(value)} clips")
                one[key] = times[i]
            elif times is not None and not (key == "start" and times == 0):
                raise RecordError(f"{name}: a record of {len(value)} clips needs a list of {key}s, got {times!r}")
        clips.append(one)
    return clips


def _load_clips(clips: list[dict], max_windows: int) -> list[np.ndarray]:
    from af2_jax.audio import windows as audio_windows

    out = []
    for clip in clips:
        wave = load_waveform(clip, max_windows)[: max_windows * audio_windows.WINDOW_SAMPLES]
        out.append(audio_windows.make_windows(wave, max_windows, name=str(clip.get("id", "<record>"))))
    return out


def _several(name: str, audios: list[np.ndarray], ids: list[int], mask: list[int], tokenizer) -> dict:
    """The example of a text with one `<audio>` per clip; one clip keeps the single-audio layout."""
    found = ids.count(tokenizer.audio_id)
    if found != len(audios):
        raise RecordError(f"{name}: its text holds {found} <audio> tokens for {len(audios)} clips (a prompt with its "
                          f"own <audio>, or a dialogue cut by max_tokens before a clip's turn)")
    if not any(mask):
        raise RecordError(f"{name}: no answer token left within max_tokens (text too long)")
    example = {"id": name, "input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.float32)}
    if len(audios) == 1:
        example["windows"] = audios[0]
    else:
        example["audios"] = audios
    return example


def make_interleaved_example(record: dict, tokenizer, *, max_windows: int, max_tokens: int) -> dict:
    """A few-shot record (lists of prompts and answers, examples first) -> an example in AF1's ICL text; examples
    that do not fit `max_tokens` are dropped from the front, with their clips."""
    name = str(record.get("id", "<record>"))
    prompts, answers = record["prompt"], record.get("answer")
    clips = clip_records(record)
    if (not isinstance(answers, list) or len(prompts) != len(answers) or len(prompts) != len(clips)
            or not all(isinstance(t, str) for t in prompts + answers)):
        raise RecordError(f"{name}: an interleaved record needs as many prompt and answer strings as clips "
                          f"({len(clips)})")
    try:
        ids, mask, kept = encode_icl_example(tokenizer, list(zip(prompts[:-1], answers[:-1])), prompts[-1],
                                             answers[-1], kind=record.get("interleaved", "similar"),
                                             task=record.get("task"), max_len=max_tokens)
    except (PromptTooLongError, ValueError) as error:
        raise RecordError(f"{name}: {error}") from None
    audios = _load_clips(clips[len(clips) - 1 - kept:], max_windows)
    return _several(name, audios, ids, mask, tokenizer)


def make_chat_example(record: dict, tokenizer, *, max_windows: int, max_tokens: int) -> dict:
    """A chat record (dialogue rounds, clips attached at `audio_turns`) -> an example in AF1's chat text, every
    assistant answer a target."""
    name = str(record.get("id", "<record>"))
    dialogue = record["dialogue"]
    try:
        rounds = [(turn["user"], turn["assistant"]) if isinstance(turn, dict) else tuple(turn) for turn in dialogue]
        clips = clip_records(record)
        ids, mask = encode_chat(tokenizer, rounds, audio_turns=record.get("audio_turns") or [0] * len(clips),
                                max_len=max_tokens)
    except (KeyError, TypeError, ValueError) as error:
        raise RecordError(f"{name}: bad dialogue ({error})") from None
    return _several(name, _load_clips(clips, max_windows), ids, mask, tokenizer)


def make_example(record: dict, tokenizer, *, max_windows: int, max_tokens: int) -> dict:
    """Record -> {'windows' (n, 160000) float32, 'input_ids' (L,) int32, 'loss_mask' (L,) float32, 'id'}; several
    clips (interleaved or chat records) give 'audios' (a list of windows) instead of 'windows'."""
    from af2_jax.audio import windows as audio_windows

    name = str(record.get("id", "<record>"))
    if "dialogue" in record:
        return make_chat_example(record, tokenizer, max_windows=max_windows, max_tokens=max_tokens)
    if isinstance(record.get("prompt"), list):
        return make_interleaved_example(record, tokenizer, max_windows=max_windows, max_tokens=max_tokens)
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
