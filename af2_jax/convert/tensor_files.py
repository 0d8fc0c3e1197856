"""Streaming access to foreign tensor files: safetensors (one file, many shards, or an HF index) and torch `.pt`.

Only safe formats are read: safetensors, and torch files through `torch.load(weights_only=True)` (never a plain
unpickle). Tensors are read one at a time, so converting a 7B checkpoint never holds two copies of it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


class UnreadableFileError(ValueError):
    """A tensor file that is not what its name says (garbage, truncated, or unsafe to unpickle)."""


class SafetensorsSource:
    """One or many safetensors files seen as one state dict (keys must not repeat across files)."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise FileNotFoundError("no safetensors files given")
        self._where: dict[str, Path] = {}
        for path in self.paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such safetensors file")
            try:
                f = safe_open(str(path), framework="numpy")
            except Exception as e:  # the Rust error (header too large, invalid JSON...) says what; we add which file
                raise UnreadableFileError(f"{path}: not a readable safetensors file ({e})") from None
            with f:
                for key in f.keys():
                    if key in self._where:
                        raise ValueError(f"key {key!r} appears in both {self._where[key]} and {path}")
                    self._where[key] = path
        self._open_path: Path | None = None
        self._open = None

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, index_name: str = "model.safetensors.index.json") -> "SafetensorsSource":
        """An HF-style directory: the files named by its index json, or else every *.safetensors in it."""
        directory = Path(directory)
        index = directory / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls(directory / f for f in files)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors files and no {index_name}")
        return cls(files)

    def keys(self) -> list[str]:
        # file by file, so that reads stay sequential within a shard
        return sorted(self._where, key=lambda k: (self.paths.index(self._where[k]),))

    def _file(self, key: str):
        path = self._where[key]
        if path != self._open_path:
            if self._open is not None:
                self._open.__exit__(None, None, None)
            self._open = safe_open(str(path), framework="numpy")
            self._open.__enter__()
            self._open_path = path
        return self._open

    def get(self, key: str) -> np.ndarray:
        return self._file(key).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """Without reading the tensor (from the file's header)."""
        return tuple(self._file(key).get_slice(key).get_shape())


class TorchFileSource:
    """A torch state-dict file read with `torch.load(weights_only=True, mmap=True)` (no arbitrary unpickling).

    `select_prefix` keeps only keys under that prefix and strips it (e.g. 'module.audio_branch.' of an AF-CLAP
    checkpoint); the dict may be nested under 'state_dict' or 'model_state_dict'.
    """

    def __init__(self, path: str | os.PathLike, select_prefix: str = ""):
        import torch  # only needed for .pt files

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            try:
                obj = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                obj = torch.load(str(self.path), map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated, or holding objects weights_only refuses to unpickle
            raise UnreadableFileError(f"{self.path}: not a readable torch state-dict file "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        for nested in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(nested), dict):
                obj = obj[nested]
                break
        if not isinstance(obj, dict):
            raise ValueError(f"{self.path}: expected a state dict, found {type(obj).__name__}")
        self._tensors = {k[len(select_prefix):]: v for k, v in obj.items() if k.startswith(select_prefix)}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, key: str) -> np.ndarray:
        return torch_to_numpy(self._tensors[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)


def torch_to_numpy(t) -> np.ndarray:
    """Exact conversion, bfloat16 included (numpy has no native bf16; ml_dtypes provides it)."""
    import ml_dtypes
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class ChainSource:
    """Several sources seen as one; a key present in more than one must hold equal values in each."""

    def __init__(self, *sources):
        self._sources = sources
        self._where: dict[str, list] = {}
        for s in sources:
            for k in s.keys():
                self._where.setdefault(k, []).append(s)

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> np.ndarray:
        first, *others = self._where[key]
        value = first.get(key)
        for other in others:
            if not np.array_equal(value, other.get(key)):
                raise ValueError(f"key {key!r} differs between the sources that hold it")
        return value

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key][0].shape(key)


class PrefixView:
    """The keys of `source` that start with `prefix`, seen with that prefix replaced by `replace_with` (kept when
    None): one component of a whole-model state dict, a DDP 'module.' stripped, AF-CLAP's audio branch renamed."""

    def __init__(self, source, prefix: str, replace_with: str | None = None):
        self.source, self.prefix = source, prefix
        self.replace_with = prefix if replace_with is None else replace_with
        self._names = {self.replace_with + k[len(prefix):]: k for k in source.keys() if k.startswith(prefix)}

    def keys(self) -> list[str]:
        return list(self._names)

    def get(self, key: str) -> np.ndarray:
        return self.source.get(self._names[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(self._names[key])


class ShardedSafetensorsWriter:
    """Writes (key, array) pairs into safetensors shards of at most `max_shard_bytes`, plus an HF index json."""

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = 4 << 30,
                 prefix: str = "model", metadata: Mapping[str, str] | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self.metadata = dict(metadata or {"format": "pt"})
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[dict[str, np.ndarray] | str] = []
        self._weight_map: dict[str, str] = {}
        self._total = 0
        self._count = 0

    def add(self, key: str, value: np.ndarray) -> None:
        if key in self._weight_map or key in self._pending:
            raise ValueError(f"key {key!r} written twice")
        value = np.ascontiguousarray(value)
        if self._pending and self._pending_bytes + value.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = value
        self._pending_bytes += value.nbytes
        self._total += value.nbytes

    def _flush(self) -> None:
        self._count += 1
        name = f"{self.prefix}-{self._count:05d}.safetensors.tmp"
        save_file(self._pending, str(self.directory / name), metadata=self.metadata)
        for k in self._pending:
            self._weight_map[k] = name
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Finishes the shards (renamed to HF's -0000k-of-0000n pattern, or one model.safetensors)."""
        if self._pending or not self._count:
            self._flush()
        n = self._count
        final = {}
        for i in range(1, n + 1):
            tmp = f"{self.prefix}-{i:05d}.safetensors.tmp"
            name = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / tmp, self.directory / name)
            final[tmp] = name
        weight_map = {k: final[v] for k, v in self._weight_map.items()}
        if n > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [self.directory / name for name in sorted(set(final.values()))]


def write_all(writer: ShardedSafetensorsWriter, items: Iterator[tuple[str, np.ndarray]]) -> list[Path]:
    for key, value in items:
        writer.add(key, value)
    return writer.close()
