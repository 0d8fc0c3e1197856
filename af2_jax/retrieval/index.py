"""An exact nearest-neighbour index over clip embeddings (faiss-cpu), saved as two files and reloaded without
pickle:

    DIR/index.faiss     faiss.write_index of an IndexFlatIP (unit vectors: inner product = cosine) or IndexFlatL2
                        (squared L2, AF1's choice; for unit vectors the same ranking)
    DIR/entries.json    {"format", "metric", "dim", "embedding", "model", "manifest", "entries": [...]}: entry i is
                        row i of the index ({id, audio, start, duration, prompt, answer, ...} of the manifest record)

Flat indexes are exact, so a search equals a brute-force ranking (ties aside).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import numpy as np

FORMAT = "af2-jax-clip-index/1"
INDEX_FILE = "index.faiss"
ENTRIES_FILE = "entries.json"
METRICS = ("ip", "l2")


class IndexFileError(ValueError):
    """An index directory that cannot be used (missing or inconsistent files); the message says which."""


@dataclasses.dataclass
class ClipIndex:
    index: Any  # a faiss.Index (flat)
    entries: list[dict]
    metric: str = "ip"
    embedding: str = ""  # how the vectors were made: 'afclap' | 'af2-htsat'
    model: str = ""  # the model directory that made them (infer --shots embeds its queries with the same one)
    manifest: str = ""

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the k nearest entries per query, best first: inner products (ip, higher is nearer)
        or squared distances (l2, lower is nearer). Rows past the index size are -1."""
        queries = np.ascontiguousarray(np.asarray(queries, np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}), got {queries.shape}")
        return self.index.search(queries, int(k))

    def save(self, directory) -> pathlib.Path:
        import faiss

        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        meta = {"format": FORMAT, "metric": self.metric, "dim": self.dim, "size": len(self),
                "embedding": self.embedding, "model": self.model, "manifest": self.manifest,
                "entries": self.entries}
        (directory / ENTRIES_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        return directory


def build_index(embeddings: np.ndarray, entries: Sequence[dict], *, metric: str = "ip", **meta) -> ClipIndex:
    """An exact index of (n, d) embeddings with one entry dict per row (ip: rows should be unit vectors)."""
    import faiss

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    embeddings = np.ascontiguousarray(np.asarray(embeddings, np.float32))
    if embeddings.ndim != 2 or len(embeddings) != len(entries) or len(entries) == 0:
        raise ValueError(f"need (n >= 1, d) embeddings and n entries, got {embeddings.shape} and {len(entries)}")
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("embeddings hold non-finite values")
    index = faiss.IndexFlatIP(embeddings.shape[1]) if metric == "ip" else faiss.IndexFlatL2(embeddings.shape[1])
    index.add(embeddings)
    return ClipIndex(index, [dict(e) for e in entries], metric=metric, **meta)


def load_index(directory) -> ClipIndex:
    """The index saved in `directory` (faiss.read_index and JSON only: nothing is unpickled)."""
    import faiss

    directory = pathlib.Path(directory)
    for name in (INDEX_FILE, ENTRIES_FILE):
        if not (directory / name).is_file():
            raise IndexFileError(f"{directory}: no {name} (not an index directory; build one with launch/build_index.py)")
    try:
        meta = json.loads((directory / ENTRIES_FILE).read_text())
    except json.JSONDecodeError as e:
        raise IndexFileError(f"{directory / ENTRIES_FILE}: invalid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFileError(f"{directory / ENTRIES_FILE}: not a {FORMAT} file")
    index = faiss.read_index(str(directory / INDEX_FILE))
    if index.ntotal != len(meta["entries"]) or index.d != meta["dim"]:
        raise IndexFileError(f"{directory}: index.faiss has {index.ntotal} vectors of {index.d}, entries.json "
                          f"{len(meta['entries'])} of {meta['dim']}: they do not belong together")
    return ClipIndex(index, meta["entries"], metric=meta["metric"], embedding=meta.get("embedding", ""),
                     model=meta.get("model", ""), manifest=meta.get("manifest", ""))
