"""The Grain input pipeline: blended sources -> per-process slice -> decode + tokenise -> bucketed, padded batches.

    sources (synthetic / manifests / ArrayRecord), each globally shuffled by seed, repeated, mixed by weight
      -> ds[process_index::process_count]                     (each host reads its own share, MaxText style)
      -> map(record -> example | Skipped)                     (decode, resample, window, tokenise with loss mask)
      -> BucketBatchIterDataset                               (batches of similar window count, exact resume)
      -> mp_prefetch(num_workers)                              (all of the above in worker processes)
      -> accounting                                            (main process: skip counter, padding fraction)

A batch is a dict of numpy arrays with exactly the keys of `batching.BATCH_KEYS`. The iterator is a grain
`DatasetIterator`: `get_state()` / `set_state()` (or grain.checkpoint with Orbax) resume it exactly.
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import grain

from af2_jax.data import bucketing, sources
from af2_jax.data.examples import make_example_or_skip

PADDING_LOG_EVERY = 100  # batches
# Warn once when more than this share of the records read so far was skipped (after at least HIGH_SKIP_MIN_RECORDS).
HIGH_SKIP_SHARE = 0.2
HIGH_SKIP_MIN_RECORDS = 50


def ensure_absl_flags_parsed(argv=None) -> None:
    """Parse `argv` (default sys.argv) into absl FLAGS unless done already; unknown flags are ignored.

    Grain reads its own absl flags when it starts worker processes, and fresh workers never parsed FLAGS; under
    pytest or a plain script nobody did either, and reading any flag would raise UnparsedFlagAccessError."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        try:
            flags.FLAGS(list(sys.argv if argv is None else argv), known_only=True)
        except flags.Error:
            flags.FLAGS.mark_as_parsed()


class _ParseAbslFlags:
    """Worker init: parse the parent's command line into the worker's absl FLAGS."""

    def __init__(self, argv):
        self._argv = list(argv)

    def __call__(self, worker_index: int, worker_count: int) -> None:
        ensure_absl_flags_parsed(self._argv)


def make_record_dataset(data_config, *, seed: int, process_index: int = 0, process_count: int = 1,
                        epochs: int | None = None, shuffle: bool = True) -> grain.MapDataset:
    """This process's records (not yet decoded): the seeded blend, then every process_count-th from process_index."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    ds = sources.blend(data_config, seed=seed, shuffle=shuffle, epochs=epochs)
    return ds[process_index::process_count]


def make_dataset(data_config, tokenizer, *, seed: int, batch_size: int, max_windows: int, max_tokens: int,
                 process_index: int = 0, process_count: int = 1, num_workers: int = 0, epochs: int | None = None,
                 shuffle: bool = True, drop_remainder: bool = True, max_pending: int | None = None,
                 worker_buffer_size: int = 2, window_buckets=()) -> grain.IterDataset:
    """The per-process stream of batches (`batch_size` is per process). See the module docstring."""
    ds = make_record_dataset(data_config, seed=seed, process_index=process_index, process_count=process_count,
                             epochs=epochs, shuffle=shuffle)
    ds = ds.map(functools.partial(make_example_or_skip, tokenizer=tokenizer, max_windows=max_windows,
                                  max_tokens=max_tokens))
    ds = bucketing.BucketBatchIterDataset(ds, batch_size=batch_size, pad_id=tokenizer.pad_id,
                                          max_tokens=max_tokens, max_pending=max_pending,
                                          drop_remainder=drop_remainder, window_buckets=window_buckets)
    if num_workers > 0:
        ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=worker_buffer_size),
                            worker_init_fn=_ParseAbslFlags(sys.argv))
    return AccountingIterDataset(ds)


def make_iterator(data_config, tokenizer, **kwargs) -> "AccountingIterator":
    """`iter(make_dataset(...))`: a checkpointable iterator with `num_skipped`, `skipped` and `padding_fraction`."""
    return iter(make_dataset(data_config, tokenizer, **kwargs))


class AccountingIterDataset(grain.IterDataset):
    """Strips the workers' private batch keys, counting skipped records and padded windows in the main process."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> "AccountingIterator":
        return AccountingIterator(self._parent.__iter__())


class AccountingIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.num_skipped = 0
        self.skipped: list[tuple[str, str]] = []  # the most recent (record id, reason), for logs and tests
        self._reported: set[str] = set()  # record ids whose reason was logged (the data repeats every epoch)
        self._warned_share = False
        self.num_rows = 0
        self.num_batches = 0
        self.real_windows = 0
        self.total_windows = 0

    @property
    def padding_fraction(self) -> float:
        """Share of audio windows in all batches so far that were padding."""
        return 1.0 - self.real_windows / self.total_windows if self.total_windows else 0.0

    def __next__(self) -> dict[str, Any]:
        batch = dict(next(self._parent))
        for record_id, reason in batch.pop(bucketing.SKIPPED_KEY):
            self.num_skipped += 1
            self.skipped = (self.skipped + [(record_id, reason)])[-100:]
            if record_id not in self._reported:  # each record's reason once; later passes are only counted
                self._reported.add(record_id)
                logging.warning("skipped record %s (%d skipped so far): %s", record_id, self.num_skipped, reason)
        self.real_windows += int(batch.pop(bucketing.REAL_WINDOWS_KEY))
        self.total_windows += int(batch["audio_mask"].size)
        self.num_rows += int(batch["audio_mask"].shape[0])
        self.num_batches += 1
        seen = self.num_rows + self.num_skipped
        if not self._warned_share and seen >= HIGH_SKIP_MIN_RECORDS and self.num_skipped > HIGH_SKIP_SHARE * seen:
            self._warned_share = True
            logging.warning("data: %d of the %d records read so far (%.0f%%) were skipped (%d distinct); the "
                            "model sees the rest more often than their weights say", self.num_skipped, seen,
                            100 * self.num_skipped / seen, len(self._reported))
        if self.num_batches % PADDING_LOG_EVERY == 0:
            logging.info("data: %d batches, audio padding %.1f%% of windows, %d records skipped (%d distinct)",
                         self.num_batches, 100 * self.padding_fraction, self.num_skipped, len(self._reported))
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "num_skipped": self.num_skipped, "num_batches": self.num_batches,
                "real_windows": self.real_windows, "total_windows": self.total_windows, "num_rows": self.num_rows}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.num_skipped = int(state["num_skipped"])
        self.num_batches = int(state["num_batches"])
        self.real_windows = int(state["real_windows"])
        self.total_windows = int(state["total_windows"])
        self.num_rows = int(state.get("num_rows", 0))  # absent in checkpoints of older runs

    def close(self) -> None:
        """Stops worker processes (mp_prefetch) now rather than at garbage collection."""
        if hasattr(self._parent, "close"):
            self._parent.close()
