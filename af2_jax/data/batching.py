"""Examples -> one batch: audio padded to the batch's largest window count, text right-padded to a fixed length.

Keys and dtypes (the train and eval steps rely on exactly these):
  audio (B, W, 160000) float32, audio_mask (B, W) float32,
  input_ids (B, T) int32, attention_mask (B, T) int32, loss_mask (B, T) float32,
where W = the largest window count in the batch, or `num_windows` (a window bucket) when given (padded windows are
zeros with mask 0, as the reference's collator) and T = max_tokens for every batch (a fixed text length avoids
recompiling).

A batch holding an example with several audios (interleaved few-shot or chat records, docs/ICL.md) takes the
multi-audio layout of docs/MULTI_AUDIO.md instead: audio (B, A, W, 160000), audio_mask (B, A, W), A = the most audios
of an example (or `num_audios`), W = the most windows of one audio (or `num_windows`); example i's audio a is slot a,
missing slots and windows are zeros with mask 0. A batch of single-audio examples is exactly the layout above.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

BATCH_KEYS = ("audio", "audio_mask", "input_ids", "attention_mask", "loss_mask")


def example_audios(example: dict) -> list[np.ndarray]:
    """An example's clips as a list of (n, 160000) windows (one for a single-audio example)."""
    return list(example["audios"]) if "audios" in example else [example["windows"]]


def collate(examples: Sequence[dict], *, pad_id: int, max_tokens: int,
            num_windows: int | None = None, num_audios: int | None = None) -> dict[str, np.ndarray]:
    from af2_jax.audio.windows import pad_audios, pad_batch

    audios = [example_audios(e) for e in examples]
    if max(len(a) for a in audios) > 1 or (num_audios or 1) > 1:
        audio, audio_mask = pad_audios(audios, num_audios, num_windows)
    else:
        audio, audio_mask = pad_batch([a[0] for a in audios], num_windows)
    n = len(examples)
    input_ids = np.full((n, max_tokens), pad_id, np.int32)
    attention_mask = np.zeros((n, max_tokens), np.int32)
    loss_mask = np.zeros((n, max_tokens), np.float32)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        if length > max_tokens:
            raise ValueError(f"{example.get('id')}: {length} tokens > max_tokens={max_tokens}")
        input_ids[row, :length] = example["input_ids"]
        attention_mask[row, :length] = 1
        loss_mask[row, :length] = example["loss_mask"]
    return {"audio": audio, "audio_mask": audio_mask, "input_ids": input_ids,
            "attention_mask": attention_mask, "loss_mask": loss_mask}
