"""Examples -> one batch: audio padded to the batch's largest window count, text right-padded to a fixed length.

Keys and dtypes (the train and eval steps rely on exactly these):
  audio (B, W, 160000) float32, audio_mask (B, W) float32,
  input_ids (B, T) int32, attention_mask (B, T) int32, loss_mask (B, T) float32,
where W = the largest window count in the batch, or `num_windows` (a window bucket) when given (padded windows are
zeros with mask 0, as the reference's collator) and T = max_tokens for every batch (a fixed text length avoids
recompiling).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

BATCH_KEYS = ("audio", "audio_mask", "input_ids", "attention_mask", "loss_mask")


def collate(examples: Sequence[dict], *, pad_id: int, max_tokens: int,
            num_windows: int | None = None) -> dict[str, np.ndarray]:
    from af2_jax.audio.windows import pad_batch

    audio, audio_mask = pad_batch([e["windows"] for e in examples], num_windows)
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
