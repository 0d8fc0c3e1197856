"""The AF-CLAP input pipeline: captioned clips -> fixed-shape contrastive batches, through the AF2 pipeline's Grain
machinery (seeded blend of sources, per-process slice, worker processes, skip accounting, exact resume).

    caption sources ('synthetic_captions', 'caption_manifest'), each shuffled by seed, repeated, mixed by weight
      -> random_map(record, rng -> example | Skipped)       (numpy audio front end, caption sampling, tokenising;
                                                            rng = f(seed, position in the blend): resumable)
      -> ds[process_index::process_count]
      -> batches of batch_size in arrival order             (bucketing's iterator: skip markers, NoUsableDataError,
                                                            state = next index + pending indices)
      -> mp_prefetch(num_workers)
      -> pipeline.AccountingIterDataset                      (skip counter and log, as the AF2 pipeline)

A batch (docs/CLAP_DATA.md):
  mel_fusion (B, 4, 1001, 64) float32   AF-CLAP's fusion input (af2_jax.audio.clap_features' layout)
  longer (B,) bool                      the clip is longer than 10 s (channels 1-3 are crops, 0 the whole clip)
  text_ids, text_mask (B, M + N, 77) int32   row b's M positives first, then its N negatives
  negative_valid (B, N) float32         1 for a real negative, 0 for a padding slot (its text is '', tokenised)
Positives: a record with fewer than M captions repeats some (drawn with replacement after using each once); with
more, M are drawn without replacement, so each epoch may see other captions. Negatives: up to N drawn without
replacement; missing ones are padding slots with negative_valid 0, which the loss must mask out.
"""
from __future__ import annotations

import functools
import math
import sys
from typing import Any

import grain
import numpy as np

from af2_jax.audio import clap_features
from af2_jax.audio import mel as mel_lib
from af2_jax.data import bucketing, pipeline, sources
from af2_jax.data import config as data_config_lib
from af2_jax.data.examples import RecordError, Skipped

CLAP_BATCH_KEYS = ("mel_fusion", "longer", "text_ids", "text_mask", "negative_valid")
MAX_SECONDS = 300.0  # audio read per clip; longer files are cut (the fusion crops then come from the first 5 min)
FRAME_BLOCK = 4096  # STFT frames per block: a 5-minute clip's frames would otherwise take ~250 MB at once
# AccountingIterator counts rows through the AF2 batch's 'audio_mask' (one entry per window); a CLAP row is one
# "window", so the batcher adds a (B, 1) mask of ones for it and ClapIterator removes it again.
_ROWS_KEY = "audio_mask"


# ------------------------------------------------------------------------------------------------------- the audio
def load_clap_waveform(record: dict, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """The record's audio as AF-CLAP reads it (librosa.load(sr=16000): channels averaged, resampled, no peak
    normalisation), from 'start' for at most 'duration' and `max_seconds` seconds: (N,) float32."""
    from af2_jax.audio import io

    name = str(record.get("id", "<record>"))
    start = float(record.get("start") or 0.0)
    duration = record.get("duration")
    duration = max_seconds if duration is None else min(float(duration), max_seconds)
    if "waveform" in record:
        rate = int(record.get("sample_rate", io.TARGET_RATE))
        samples = np.asarray(record["waveform"], np.float64)
        first = int(round(start * rate))
        samples = samples[first: first + int(round(duration * rate))]
    elif "audio" in record:
        samples, rate = io.decode(record["audio"], start=start, duration=duration)
        name = str(record["audio"])
    else:
        raise RecordError(f"{name}: record has no audio ('audio' path or 'waveform')")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.ndim != 1 or samples.size == 0:
        raise io.AudioError(name, f"no audio samples (shape {samples.shape})")
    if not np.all(np.isfinite(samples)):
        raise io.AudioError(name, f"{int(np.sum(~np.isfinite(samples)))} NaN or infinite samples")
    if rate != io.TARGET_RATE:
        import librosa

        samples = librosa.resample(samples, orig_sr=rate, target_sr=io.TARGET_RATE)  # librosa.load's default (soxr_hq)
        if samples.size == 0:
            raise io.AudioError(name, f"too short to resample from {rate} Hz")
    return samples.astype(np.float32)


def host_log_mel(waveform: np.ndarray) -> np.ndarray:
    """(N,) float32 -> (1 + N // 160, 64) log-mel (dB): clap_features.log_mel_frames in numpy (same STFT and
    filterbank, within 1e-4 dB). Data workers then never start a JAX backend or compile per clip length."""
    x = np.asarray(waveform, np.float32)
    half = mel_lib.N_FFT // 2
    if x.ndim != 1 or x.shape[0] <= half:
        raise ValueError(f"host_log_mel needs a 1-D waveform of more than {half} samples, got shape {x.shape}")
    padded = np.pad(x, (half, half), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, mel_lib.N_FFT)[::mel_lib.HOP]
    frames = frames[: 1 + x.shape[0] // mel_lib.HOP]  # centre frames: one per hop, as torchaudio
    window = mel_lib._hann_window()
    bank = mel_lib.mel_filterbank()
    out = np.empty((frames.shape[0], mel_lib.N_MELS), np.float32)
    for first in range(0, frames.shape[0], FRAME_BLOCK):
        spectrum = np.fft.rfft(frames[first:first + FRAME_BLOCK] * window, axis=-1)
        power = (np.square(spectrum.real) + np.square(spectrum.imag)).astype(np.float32)
        out[first:first + FRAME_BLOCK] = 10.0 * np.log10(np.maximum(power @ bank, mel_lib.AMIN))
    return out


def host_clap_features(waveform: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """clap_features.clap_audio_features (int16 round trip, repeat-pad <= 10 s, fusion crops > 10 s) with the
    numpy mel: (mel_fusion (4, 1001, 64) float32, longer). Crop starts are drawn from `rng`."""
    x = clap_features.int16_round_trip(waveform)
    if x.shape[0] == 0:
        raise ValueError("empty waveform")
    if x.shape[0] <= clap_features.MAX_SAMPLES:
        mel = host_log_mel(clap_features.repeat_pad(x))
        return np.repeat(mel[None], clap_features.CHANNELS, axis=0), False
    mel = host_log_mel(x)
    if mel.shape[0] == clap_features.CHUNK_FRAMES:  # 10 s < length < 10 s + one hop: the short layout
        return np.repeat(mel[None], clap_features.CHANNELS, axis=0), False
    starts = clap_features.fusion_starts(mel.shape[0], rng)
    crops = [mel[s:s + clap_features.CHUNK_FRAMES] for s in starts]
    whole = clap_features.resize_bilinear_antialias(mel, (clap_features.CHUNK_FRAMES, mel.shape[1]))
    return np.stack([whole, *crops]), True


# ------------------------------------------------------------------------------------------------------- the texts
def choose_texts(captions, negatives, num_positives: int, num_negatives: int,
                 rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """M positives then N negative slots (texts) and the (N,) float32 validity of the negative slots."""
    captions = list(captions)
    if not captions:
        raise RecordError("no caption")
    order = rng.permutation(len(captions))
    if len(captions) >= num_positives:
        picked = order[:num_positives]
    else:  # every caption once, then repeats drawn with replacement
        picked = np.concatenate([order, rng.integers(0, len(captions), num_positives - len(captions))])
    positives = [captions[int(k)] for k in picked]
    negatives = list(negatives or [])
    real = min(len(negatives), num_negatives)
    chosen = [negatives[int(k)] for k in rng.permutation(len(negatives))[:real]]
    valid = np.zeros((num_negatives,), np.float32)
    valid[:real] = 1.0
    return positives + chosen + [""] * (num_negatives - real), valid


def make_clap_example(record: dict, rng: np.random.Generator, *, tokenizer, num_positives: int,
                      num_negatives: int, max_seconds: float = MAX_SECONDS) -> dict:
    """Record -> {'mel_fusion', 'longer', 'text_ids', 'text_mask', 'negative_valid', 'id'} (one batch row)."""
    name = str(record.get("id", "<record>"))
    texts, valid = choose_texts(record.get("captions"), record.get("negatives"), num_positives, num_negatives, rng)
    mel_fusion, longer = host_clap_features(load_clap_waveform(record, max_seconds), rng)
    ids, mask = tokenizer(texts)
    return {"id": name, "mel_fusion": mel_fusion.astype(np.float32), "longer": np.bool_(longer),
            "text_ids": np.asarray(ids, np.int32), "text_mask": np.asarray(mask, np.int32), "negative_valid": valid}


def make_clap_example_or_skip(record, rng, **kwargs):
    """make_clap_example, but any failure becomes a `Skipped` marker (counted by the pipeline, never fatal)."""
    try:
        return make_clap_example(record, rng, **kwargs)
    except Exception as error:  # noqa: BLE001 - one bad record must not end training
        return Skipped(str(record.get("id", "<record>")) if isinstance(record, dict) else "<record>",
                       f"{type(error).__name__}: {error}")


def collate_clap(examples) -> dict[str, np.ndarray]:
    return {
        "mel_fusion": np.stack([e["mel_fusion"] for e in examples]).astype(np.float32),
        "longer": np.array([bool(e["longer"]) for e in examples], bool),
        "text_ids": np.stack([e["text_ids"] for e in examples]).astype(np.int32),
        "text_mask": np.stack([e["text_mask"] for e in examples]).astype(np.int32),
        "negative_valid": np.stack([e["negative_valid"] for e in examples]).astype(np.float32),
    }


# ------------------------------------------------------------------------------------------------------ batching
class _ClapBatchIterDataset(bucketing.BucketBatchIterDataset):
    """bucketing's batcher with every example in one bucket (all rows have the same shapes): batches in arrival
    order, with its skip markers, consecutive-skip limit, worker slicing and index-based state."""

    def __iter__(self) -> "_ClapBatchIterator":
        return _ClapBatchIterator(self._parent, batch_size=self._batch_size, pad_id=0, max_tokens=0,
                                  max_pending=self._batch_size, drop_remainder=self._drop_remainder,
                                  max_consecutive_skips=self._max_consecutive_skips)


class _ClapBatchIterator(bucketing.BucketBatchIterator):
    """Reuses the parent's reading, skip accounting and state; the batching policy is its own (CLAP rows have no
    'windows' to group by), so every hook that would read them is replaced here."""

    def _windows_at(self, position: int) -> int:
        return 1

    def _choose_batch(self) -> list[int] | None:
        """The oldest batch_size pending examples, as soon as there are that many (no length grouping)."""
        return list(range(self._batch_size)) if len(self._pending) >= self._batch_size else None

    def _audios_at(self, position: int) -> int:  # one clip per row, whatever its length
        return 1

    def _emit(self, positions: list[int]) -> dict[str, Any]:
        chosen = set(positions)
        examples = [self._pending[p][1] for p in positions]
        self._pending = [item for p, item in enumerate(self._pending) if p not in chosen]
        batch = collate_clap(examples)
        batch[bucketing.SKIPPED_KEY] = self._skipped
        batch[bucketing.REAL_WINDOWS_KEY] = np.int64(len(examples))
        batch[_ROWS_KEY] = np.ones((len(examples), 1), np.float32)
        self._skipped = []
        return batch


class ClapIterDataset(grain.IterDataset):
    def __iter__(self) -> "ClapIterator":
        return ClapIterator(self._parent.__iter__())


class ClapIterator(grain.DatasetIterator):
    """pipeline.AccountingIterator's batches without its row-count key: `num_skipped`, `skipped` (the last 100
    (id, reason)), `num_batches`, `num_rows`; get_state() / set_state() resume exactly."""

    def __init__(self, parent: pipeline.AccountingIterator):
        super().__init__(parent)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        del batch[_ROWS_KEY]
        return batch

    num_skipped = property(lambda self: self._parent.num_skipped)
    skipped = property(lambda self: self._parent.skipped)
    num_batches = property(lambda self: self._parent.num_batches)
    num_rows = property(lambda self: self._parent.num_rows)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def close(self) -> None:
        self._parent.close()


# ------------------------------------------------------------------------------------------------------ datasets
def caption_config(data_config, *, num_positives: int, num_negatives: int) -> dict:
    """The config with only caption kinds allowed, and synthetic caption sources making M and N captions unless
    they say otherwise."""
    config = data_config_lib.as_dict(data_config)
    data_config_lib.validate(config)
    for k, source in enumerate(config["sources"]):
        if source["kind"] not in data_config_lib.CAPTION_KINDS:
            raise ValueError(f"data config: sources[{k}].kind {source['kind']!r} has no captions; the AF-CLAP "
                             f"pipeline reads {data_config_lib.CAPTION_KINDS}")
        if source["kind"] == "synthetic_captions":
            source.setdefault("num_positives", num_positives)
            source.setdefault("num_negatives", num_negatives)
    return config


def _check_sizes(num_positives: int, num_negatives: int, process_index: int, process_count: int) -> None:
    if num_positives < 1 or num_negatives < 0:
        raise ValueError(f"need num_positives >= 1 and num_negatives >= 0, got {num_positives}, {num_negatives}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")


def make_clap_record_dataset(data_config, *, seed: int, num_positives: int, num_negatives: int,
                             process_index: int = 0, process_count: int = 1, epochs: int | None = None,
                             shuffle: bool = True) -> grain.MapDataset:
    """This process's caption records (not decoded): the seeded blend, every process_count-th from process_index."""
    _check_sizes(num_positives, num_negatives, process_index, process_count)
    config = caption_config(data_config, num_positives=num_positives, num_negatives=num_negatives)
    return sources.blend(config, seed=seed, shuffle=shuffle, epochs=epochs)[process_index::process_count]


def make_clap_dataset(data_config, tokenizer, *, seed: int, batch_size: int, num_positives: int,
                      num_negatives: int, process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                      epochs: int | None = None, shuffle: bool = True, drop_remainder: bool = True,
                      max_seconds: float = MAX_SECONDS, worker_buffer_size: int = 2,
                      max_consecutive_skips: int = bucketing.MAX_CONSECUTIVE_SKIPS) -> grain.IterDataset:
    """The per-process stream of CLAP batches (`batch_size` per process). See the module docstring."""
    _check_sizes(num_positives, num_negatives, process_index, process_count)
    if not max_seconds > 0 or not math.isfinite(max_seconds):
        raise ValueError(f"max_seconds must be a positive number, got {max_seconds}")
    config = caption_config(data_config, num_positives=num_positives, num_negatives=num_negatives)
    ds = sources.blend(config, seed=seed, shuffle=shuffle, epochs=epochs)
    # The random map comes before the slice: each element's rng depends on its place in the global blend, so
    # processes never share crop or caption draws, and a resumed iterator redraws the same ones.
    ds = ds.random_map(functools.partial(make_clap_example_or_skip, tokenizer=tokenizer,
                                         num_positives=num_positives, num_negatives=num_negatives,
                                         max_seconds=max_seconds),
                       seed=(int(seed) * 1000003 + 7) % 2 ** 32)
    ds = ds[process_index::process_count]
    ds = _ClapBatchIterDataset(ds, batch_size=batch_size, pad_id=0, max_tokens=0, drop_remainder=drop_remainder,
                               max_consecutive_skips=max_consecutive_skips)
    if num_workers > 0:
        pipeline.ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=worker_buffer_size),
                            worker_init_fn=pipeline._ParseAbslFlags(sys.argv))
    return ClapIterDataset(pipeline.AccountingIterDataset(ds))


def make_clap_iterator(data_config, tokenizer, *, seed: int, batch_size: int, num_positives: int,
                       num_negatives: int, process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                       epochs: int | None = None, **kwargs) -> ClapIterator:
    """`iter(make_clap_dataset(...))`: a checkpointable iterator with `num_skipped` and `skipped`."""
    return iter(make_clap_dataset(data_config, tokenizer, seed=seed, batch_size=batch_size,
                                  num_positives=num_positives, num_negatives=num_negatives,
                                  process_index=process_index, process_count=process_count,
                                  num_workers=num_workers, epochs=epochs, **kwargs))

