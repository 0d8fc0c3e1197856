"""Choosing a query's k in-context examples, as AF1's `prepare_each_dataset.py` does (af1_reference.md section 4):

- retrieved ('similar'): the index's top k + 50 neighbours, grouped by audio file (a file may be several entries,
  e.g. several captions of one clip) with one random entry per file among its hits; the query's own file and own
  entry are dropped; the first k files in rank order are kept, then shuffled. AF1 draws with unseeded `random` and
  `np.random`; here every draw comes from a generator seeded with (seed, query number), so prompts are reproducible
  and do not depend on batching;
- random: k entries of k distinct files drawn uniformly from the index, the query's file excluded.

Fewer than k are returned only when the index has fewer usable files.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

NEIGHBOUR_MARGIN = 50  # AF1 searches n_samples + 50 neighbours before de-duplicating


def file_key(path: str | None) -> str | None:
    """What makes two entries 'the same file': their absolute, normalised audio path."""
    return None if path is None else os.path.normpath(os.path.abspath(os.path.expanduser(str(path))))


def query_rng(seed: int, query: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(query)])


def select_shots(rows: Sequence[int], entries: Sequence[dict], k: int, rng: np.random.Generator, *,
                 query_file: str | None = None, query_row: int | None = None) -> list[int]:
    """Index rows of a query's k examples from its neighbour `rows` (best first; -1 = none)."""
    own = file_key(query_file)
    hits_by_file: dict[str, list[int]] = {}  # insertion order = rank of the file's best hit
    for row in rows:
        row = int(row)
        if row < 0 or row == query_row:
            continue
        key = file_key(entries[row].get("audio"))
        if key is not None and key == own:
            continue
        hits_by_file.setdefault(key if key is not None else f"#{row}", []).append(row)
    chosen = [hits[int(rng.integers(len(hits)))] for hits in list(hits_by_file.values())[:k]]
    rng.shuffle(chosen)
    return chosen


def random_shots(entries: Sequence[dict], k: int, rng: np.random.Generator, *, query_file: str | None = None,
                 query_row: int | None = None) -> list[int]:
    """k random rows of distinct files, none of them the query's file or row."""
    own = file_key(query_file)
    order = rng.permutation(len(entries))
    chosen, files = [], set()
    for row in order:
        row = int(row)
        key = file_key(entries[row].get("audio"))
        if row == query_row or (key is not None and key == own) or (key is not None and key in files):
            continue
        chosen.append(row)
        files.add(key)
        if len(chosen) == k:
            break
    return chosen


def retrieve_shots(index, queries: np.ndarray, k: int, *, seed: int = 0, query_files: Sequence[str | None] = (),
                   query_rows: Sequence[int | None] = (), first_query: int = 0) -> list[list[int]]:
    """Each query embedding's k retrieved examples (rows of `index`); query i uses rng (seed, first_query + i)."""
    queries = np.asarray(queries, np.float32)
    if len(queries) == 0:
        return []
    _, rows = index.search(queries, min(k + NEIGHBOUR_MARGIN, len(index)))
    out = []
    for i, neighbours in enumerate(rows):
        out.append(select_shots(neighbours, index.entries, k, query_rng(seed, first_query + i),
                                query_file=query_files[i] if query_files else None,
                                query_row=query_rows[i] if query_rows else None))
    return out
