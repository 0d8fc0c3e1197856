"""Evaluate a model on a test set: load each batch's audio, generate answers, score them per task.

A test set is any sequence of records (`af2_jax.data.synthetic.SyntheticSource`, or the list that
`af2_jax.data.manifests.read_manifest` returns): a record has 'prompt', 'answer', an id, and either a 'waveform'
(with 'sample_rate') or an 'audio' path (with 'start'/'duration'), read as training reads them; 'skill' or
'dataset' names its task and 'choices' its closed answer set. Records are read one batch at a time, so a long test set never sits in memory.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from af2_jax.audio import io as audio_io
from af2_jax.audio import windows as audio_windows
from af2_jax.data.examples import RecordError, load_waveform
from af2_jax.evaluation import scoring
from af2_jax.tokenizer import extract_answer

# (per-example windows (n_i, 160000), prompts) -> decoded answers, one per prompt.
GenerateFn = Callable[[Sequence[np.ndarray], Sequence[str]], list[str]]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 8
    max_windows: int = 3

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {self.max_windows}")


class Concatenated:
    """Several record sequences read as one, lazily (a synthetic long-audio test set would not fit in memory)."""

    def __init__(self, parts: Sequence[Sequence[Mapping[str, Any]]]):
        self.parts = list(parts)
        self._starts = list(itertools.accumulate((len(p) for p in self.parts), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        part = next(k for k in range(len(self.parts)) if index < self._starts[k + 1])
        return self.parts[part][index - self._starts[part]]


def task_of(record: Mapping[str, Any]) -> str:
    """A record's task: its synthetic skill, else its dataset (an AF2 manifest's 'Name-Task')."""
    return str(record.get("skill") or record.get("dataset") or "default")


def record_windows(record: Mapping[str, Any], max_windows: int) -> np.ndarray:
    """A record's (n, 160000) windows, its audio read and prepared exactly as training reads it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", audio_io.SilentAudioWarning)
        return audio_windows.make_windows(load_waveform(record, max_windows), max_windows,
                                          name=str(record.get("id")))


def model_generate_fn(model, tokenizer, sampling) -> GenerateFn:
    """Batched generation with `model` (af2_jax.inference.generate.answer_batch); batch i samples with key
    fold_in(seed, i), so sampled runs are reproducible and batches do not repeat each other's random draws."""
    import jax

    from af2_jax.inference import generate

    generate.check_tokenizer(model.config, tokenizer)
    base_key = jax.random.key(sampling.seed)
    calls = itertools.count()

    def run(windows: Sequence[np.ndarray], prompts: Sequence[str]) -> list[str]:
        requests = [generate.Request(w, p) for w, p in zip(windows, prompts)]
        key = jax.random.fold_in(base_key, next(calls))
        return generate.answer_batch(model, tokenizer, requests, sampling, key=key)

    return run


def _example(record: Mapping[str, Any], index: int) -> dict[str, Any]:
    return {
        "id": str(record.get("id", index)),
        "task": task_of(record),
        "prompt": record["prompt"],
        "answer": record["answer"],
        "choices": list(record["choices"]) if record.get("choices") else None,
        "references": list(record["references"]) if record.get("references") else None,
    }


class NothingToEvaluate(ValueError):
    """An empty test set, or one whose every record was skipped."""


# what makes one record unusable (a missing or undecodable file, a record without audio): skipped and counted
UNREADABLE = (audio_io.AudioError, OSError, RecordError, ValueError)


def predict(generate: GenerateFn, records: Sequence[Mapping[str, Any]], settings: EvalSettings,
            *, progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(scored predictions, skipped records) in order; a record whose audio cannot be read is skipped with its
    reason (as inference and training do), the others are answered.

    A batch short of `batch_size` (the last one, or one that lost records) is filled up with copies of its last
    record (their outputs dropped), so the generation step compiles once per window count, not once more per size.
    """
    from tqdm import tqdm

    items, skipped = [], []
    starts = range(0, len(records), settings.batch_size)
    for start in tqdm(starts, desc="evaluating", unit="batch", disable=not progress):
        batch, windows = [], []
        for index in range(start, min(start + settings.batch_size, len(records))):
            record = records[index]
            try:
                windows.append(record_windows(record, settings.max_windows))
            except UNREADABLE as e:
                skipped.append({"id": str(record.get("id", index)), "task": task_of(record), "error": str(e)})
                logging.warning("skipped %s: %s", skipped[-1]["id"], e)
                continue
            batch.append((index, record))
        if not batch:
            continue
        real = len(batch)
        fill = settings.batch_size - real
        prompts = [r["prompt"] for _, r in batch]
        texts = generate(windows + [windows[-1]] * fill, prompts + [prompts[-1]] * fill)
        if len(texts) != settings.batch_size:
            raise RuntimeError(f"generate returned {len(texts)} answers for a batch of {settings.batch_size}")
        for (index, record), text in zip(batch, texts[:real]):
            items.append(scoring.score_item(_example(record, index), extract_answer(text)))
    return items, skipped


def evaluate(generate: GenerateFn, records: Sequence[Mapping[str, Any]], settings: EvalSettings,
             *, progress: bool = True, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The results payload: {'metadata', 'settings', 'tasks', 'overall', 'predictions', 'skipped'} (see
    report.write_json); metrics are over the records that could be read."""
    if len(records) == 0:
        raise NothingToEvaluate("nothing to evaluate: the test set is empty")
    items, skipped = predict(generate, records, settings, progress=progress)
    if not items:
        raise NothingToEvaluate(f"nothing could be evaluated: all {len(skipped)} records were skipped (first: "
                         f"{skipped[0]['id']}: {skipped[0]['error']})")
    tasks, overall = scoring.summarize_by_task(items)
    return {
        "metadata": dict(metadata or {}),
        "settings": dataclasses.asdict(settings),
        "tasks": tasks,
        "overall": overall,
        "predictions": items,
        "skipped": skipped,
    }
