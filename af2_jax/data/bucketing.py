"""Batches built from examples of similar window count, with an exactly resumable state.

Audio is padded to the largest window count in a batch, so mixing a 10 s clip with a 5 min one wastes 29 windows
of encoder compute. This iterator keeps a few decoded examples pending, grouped by window count, and emits a batch
as soon as one group is full; if too many are pending it emits the oldest example with its nearest neighbours.
With `window_buckets` (e.g. (1, 3, 6, 12, 30)) examples are grouped by the smallest bucket that holds them and padded
to it, so the train step compiles once per bucket rather than once per window count (each compile costs seconds on
CPU, minutes at scale), at the price of some padded windows.

Examples with several audios (interleaved few-shot, chat) are grouped by their audio count as well, so a batch of
single-audio examples keeps the single-audio layout and a few-shot batch pads few empty audio slots
(batching.collate).

It reads its parent `MapDataset` by index, so its state is just (next index, pending indices, unreported skips):
restoring re-decodes the pending examples, which are pure functions of their index. Under `mp_prefetch` each
worker process runs one copy over its slice of the parent (`set_slice`).
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from af2_jax.data.batching import collate, example_audios
from af2_jax.data.examples import Skipped

# Private keys that travel with a batch from the workers to the main process, which strips them (pipeline.py).
SKIPPED_KEY = "_skipped"
REAL_WINDOWS_KEY = "_real_windows"
# Records skipped in a row before the stream gives up. The sources are shuffled, so usable records never cluster:
# with even 99% of them bad, 1000 bad ones in a row is a 4e-5 chance; with none usable the run would spin forever.
MAX_CONSECUTIVE_SKIPS = 1000


class NoUsableDataError(RuntimeError):
    """The data stream produced only skipped records for `MAX_CONSECUTIVE_SKIPS` in a row: nothing usable is
    left (every audio file unreadable, every prompt too long...)."""


class BucketBatchIterDataset(grain.IterDataset):
    """Batches of `batch_size` examples from a MapDataset of examples (or `Skipped` markers, or None)."""

    def __init__(self, parent: grain.MapDataset, *, batch_size: int, pad_id: int, max_tokens: int,
                 max_pending: int | None = None, drop_remainder: bool = True, window_buckets=(),
                 max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS):
        super().__init__(parent)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._window_buckets = tuple(sorted(int(b) for b in window_buckets))
        if self._window_buckets and self._window_buckets[0] < 1:
            raise ValueError(f"window_buckets must be >= 1, got {window_buckets}")
        self._batch_size = batch_size
        self._pad_id = pad_id
        self._max_tokens = max_tokens
        self._max_pending = max(max_pending or 4 * batch_size, batch_size)
        self._drop_remainder = drop_remainder
        self._max_consecutive_skips = max_consecutive_skips

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Called by grain's mp_prefetch on each worker's copy: read only that worker's share of the parent."""
        self._parents = (self._parent.slice(sl),)

    def __iter__(self) -> "BucketBatchIterator":
        return BucketBatchIterator(self._parent, batch_size=self._batch_size, pad_id=self._pad_id,
                                   max_tokens=self._max_tokens, max_pending=self._max_pending,
                                   drop_remainder=self._drop_remainder, window_buckets=self._window_buckets,
                                   max_consecutive_skips=self._max_consecutive_skips)

    def __str__(self) -> str:
        return f"BucketBatchIterDataset(batch_size={self._batch_size}, max_pending={self._max_pending})"


class BucketBatchIterator(grain.DatasetIterator):

    def __init__(self, source: grain.MapDataset, *, batch_size, pad_id, max_tokens, max_pending, drop_remainder,
                 window_buckets=(), max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS):
        super().__init__()
        self._source = source
        self._length = len(source)
        self._batch_size = batch_size
        self._pad_id = pad_id
        self._max_tokens = max_tokens
        self._max_pending = max_pending
        self._drop_remainder = drop_remainder
        self._window_buckets = tuple(window_buckets)
        self._next_index = 0
        self._pending: list[tuple[int, dict]] = []  # (source index, example), oldest first
        self._skipped: list[list[str]] = []  # [record id, reason] not yet reported with a batch
        self._max_consecutive_skips = max_consecutive_skips
        self._skips_in_a_row = 0

    def __next__(self) -> dict[str, Any]:
        while True:
            chosen = self._choose_batch()
            if chosen is not None:
                return self._emit(chosen)
            if self._next_index >= self._length:
                if self._pending and not self._drop_remainder:
                    return self._emit(sorted(range(len(self._pending)), key=self._windows_at))
                raise StopIteration
            index = self._next_index
            self._next_index += 1
            self._take(index, self._source[index])

    def _take(self, index: int, item) -> None:
        if item is None:  # filtered out upstream
            return
        if isinstance(item, Skipped):
            self._skipped.append([item.record_id, item.reason])
            self._skips_in_a_row += 1
            if self._skips_in_a_row >= self._max_consecutive_skips:
                raise NoUsableDataError(
                    f"{self._skips_in_a_row} records in a row could not be used, so nothing usable is left in the "
                    f"data; the last one, {item.record_id}: {item.reason}")
        else:
            self._pending.append((index, item))
            self._skips_in_a_row = 0

    def _windows_at(self, position: int) -> int:
        """The padded window count of a pending example: its bucket, or its own count (none, or beyond the last);
        for several audios, that of its longest audio."""
        count = max(w.shape[0] for w in example_audios(self._pending[position][1]))
        return next((b for b in self._window_buckets if b >= count), count)

    def _audios_at(self, position: int) -> int:
        return len(example_audios(self._pending[position][1]))

    def _choose_batch(self) -> list[int] | None:
        """Positions in `_pending` of the next batch, or None to keep reading."""
        groups: dict[tuple[int, int], list[int]] = {}
        for position in range(len(self._pending)):
            groups.setdefault((self._audios_at(position), self._windows_at(position)), []).append(position)
        full = [members for members in groups.values() if len(members) >= self._batch_size]
        if full:
            return min(full, key=lambda members: members[0])[: self._batch_size]  # the group with the oldest
        if len(self._pending) >= self._max_pending:
            target, audios = self._windows_at(0), self._audios_at(0)
            order = sorted(range(len(self._pending)), key=lambda p: (
                abs(self._audios_at(p) - audios), abs(self._windows_at(p) - target), p))
            return order[: self._batch_size]
        return None

    def _emit(self, positions: list[int]) -> dict[str, Any]:
        chosen = set(positions)
        examples = [self._pending[p][1] for p in positions]
        num_windows = max(self._windows_at(p) for p in positions)
        num_audios = max(self._audios_at(p) for p in positions)
        self._pending = [item for p, item in enumerate(self._pending) if p not in chosen]
        batch = collate(examples, pad_id=self._pad_id, max_tokens=self._max_tokens, num_windows=num_windows,
                        num_audios=num_audios if num_audios > 1 else None)
        batch[SKIPPED_KEY] = self._skipped
        batch[REAL_WINDOWS_KEY] = np.int64(sum(w.shape[0] for e in examples for w in example_audios(e)))
        self._skipped = []
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._next_index, "pending": [index for index, _ in self._pending],
                "skipped": [list(s) for s in self._skipped], "skips_in_a_row": self._skips_in_a_row}

    def set_state(self, state: dict[str, Any]) -> None:
        self._next_index = int(state["next_index"])
        self._skipped = [list(s) for s in state["skipped"]]
        self._pending = []
        for index in state["pending"]:  # decoding is a pure function of the index: this rebuilds the buffer
            self._take(int(index), self._source[int(index)])
        self._skips_in_a_row = int(state.get("skips_in_a_row", 0))  # absent in checkpoints of older runs

    def __str__(self) -> str:
        return f"BucketBatchIterator(next_index={self._next_index}, pending={len(self._pending)})"
