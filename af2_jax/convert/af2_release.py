"""NVIDIA's AF2 PyTorch release <-> our AF2Model: the whole-model key table, the release directory layout, and the
tokenizer import. Used by `launch/convert.py af2-from-torch` / `af2-to-torch`.

Release layout (HF hub `nvidia/audio-flamingo-2*`, af2_reference.md section 7), as read by the reference's
`inference_HF_pretrained/inference.py`:

    <release>/clap_ckpt/<name>.pt        AF-CLAP training checkpoint; only `module.audio_branch.*` (the HTSAT audio
                                         branch, loaded as `clap.nvclap.*`) is used: the text branch and optimizer
                                         state are ignored by design (the import report counts them)
    <release>/safe_ckpt/metadata.json    names the chunks; the reference iterates over it, so a JSON list of chunk
                                         names and a dict keyed by chunk name both work. We WRITE a dict
                                         {chunk name: [the keys it holds]}.
    <release>/safe_ckpt/<chunk>.safetensors   the model's state dict, merged over chunks and loaded AFTER the CLAP
                                         checkpoint, so its `clap.nvclap.*` entries win.

A single state-dict file (`.safetensors`, or a `.pt` read with `torch.load(weights_only=True)`, an optional
'module.' prefix stripped) is accepted too. The reference's state dict names several tensors twice; the aliases
(`lang_encoder.old_decoder_blocks.{i}.*` = `...model.layers.{i}.decoder_layer.*`,
`lang_encoder.gated_cross_attn_layers_sound.{i}.*` = `...model.layers.{i}.gated_cross_attn_layer_sound.*`, and
the tied `lang_encoder.lm_head.weight`) are optional on import, checked equal to their twin when present, and
written on export, so the exported key set is the reference's full `state_dict()`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import save_file

from af2_jax import param_tree
from af2_jax.convert.af2_keys import CLAP_PREFIX, EMBED_KEY, af2_rules
from af2_jax.convert.mapping import ConversionError, export_tensors, import_tensors
from af2_jax.convert.tensor_files import PrefixView, SafetensorsSource, TorchFileSource

CLAP_CKPT_PREFIX = "module.audio_branch."  # the audio branch inside the AF-CLAP checkpoint
METADATA_FILE = "metadata.json"
CHUNK_BYTES = 4 << 30


# ---------------------------------------------------------------------------------------------------------------
# reading a release


class _ClapAudioBranch(PrefixView):
    """The AF-CLAP checkpoint's `module.audio_branch.*` entries seen as `clap.nvclap.*`; counts what it ignores."""

    def __init__(self, path: Path):
        self.path = path
        file = TorchFileSource(path)
        super().__init__(file, CLAP_CKPT_PREFIX, CLAP_PREFIX)
        all_keys = file.keys()
        self.ignored = len(all_keys) - len(self.keys())
        if not self.keys():
            raise ConversionError({f"{path}: no '{CLAP_CKPT_PREFIX}*' keys (not an AF-CLAP checkpoint)":
                                   all_keys[:20]})


class _Overlay:
    """`primary`'s keys over `fallback`'s (the reference loads the CLAP file first, then the chunks on top)."""

    def __init__(self, primary, fallback):
        self.primary, self.fallback = primary, fallback
        self._primary_keys = set(primary.keys())
        self.overridden = sum(k in self._primary_keys for k in fallback.keys())

    def keys(self) -> list[str]:
        return list(self.primary.keys()) + [k for k in self.fallback.keys() if k not in self._primary_keys]

    def get(self, key: str) -> np.ndarray:
        return (self.primary if key in self._primary_keys else self.fallback).get(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return (self.primary if key in self._primary_keys else self.fallback).shape(key)


def read_chunk_names(metadata_path: Path) -> list[str]:
    """Chunk names from safe_ckpt/metadata.json: a JSON list of names or a dict keyed by name."""
    try:
        data = json.loads(metadata_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{metadata_path}: not valid JSON ({e})") from None
    names = list(data) if isinstance(data, (list, dict)) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{metadata_path}: expected a non-empty JSON list of chunk names or an object keyed by "
                         f"chunk name, got {type(data).__name__}")
    return [n[:-len(".safetensors")] if n.endswith(".safetensors") else n for n in names]


@dataclasses.dataclass
class ReleaseSource:
    """A release (directory or single file) as one tensor source, plus what the import report says about it."""

    source: Any
    description: str
    clap_keys_ignored: int = 0
    clap_keys_overridden: int = 0


def _single_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        source = SafetensorsSource([path])
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        source = TorchFileSource(path)
    else:
        raise ValueError(f"{path}: unknown state-dict file type (expected .safetensors or .pt)")
    keys = source.keys()
    if keys and all(k.startswith("module.") for k in keys):
        source = PrefixView(source, "module.", "")  # every key has it
    return source


def open_release(src: str | Path) -> ReleaseSource:
    """NVIDIA's release directory (safe_ckpt/ + optional clap_ckpt/), a bare safe_ckpt directory, or one file."""
    src = Path(src)
    if src.is_file():
        return ReleaseSource(_single_file(src), f"state-dict file {src}")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such file or directory")
    safe_dir = src / "safe_ckpt" if (src / "safe_ckpt").is_dir() else src
    metadata = safe_dir / METADATA_FILE
    if not metadata.is_file():
        raise FileNotFoundError(f"{src}: no safe_ckpt/{METADATA_FILE} (not an AF2 release directory)")
    chunks = [safe_dir / f"{name}.safetensors" for name in read_chunk_names(metadata)]
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"{metadata}: names chunks that do not exist: {missing}")
    source: Any = SafetensorsSource(chunks)
    release = ReleaseSource(source, f"{len(chunks)} safetensors chunk(s) in {safe_dir}")
    clap_dir = src / "clap_ckpt"
    if clap_dir.is_dir():
        clap_files = sorted(p for p in clap_dir.iterdir() if p.suffix in (".pt", ".pth", ".ckpt"))
        if len(clap_files) > 1:
            raise ValueError(f"{clap_dir}: several CLAP checkpoints {[p.name for p in clap_files]}; keep one")
        if clap_files:
            clap = _ClapAudioBranch(clap_files[0])
            overlay = _Overlay(source, clap)
            release = ReleaseSource(overlay, f"{release.description} over {clap_files[0]}",
                                    clap_keys_ignored=clap.ignored, clap_keys_overridden=overlay.overridden)
    return release


# ---------------------------------------------------------------------------------------------------------------
# import / export


def param_shapes(config) -> dict[str, Any]:
    """Our flat path -> ShapeDtypeStruct of every variable, without allocating the model."""
    from flax import nnx

    from af2_jax.models.af2 import AF2Model

    return param_tree.model_params(param_tree.abstract_model(lambda: AF2Model(config, rngs=nnx.Rngs(0))))


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def import_release(src: str | Path, *, preset: str | None = None, dtype: Any = None, progress: bool = True,
                   overrides: Mapping[str, Any] | None = None, **config_overrides) -> tuple[Any, dict[str, np.ndarray],
                                                                                         dict]:
    """(AF2Config, flat params, report) from a release directory or state-dict file.

    The config is inferred from the checkpoint's shapes (af2_shapes.infer_config: any size converts; head counts
    no shape holds come from the preset of the same widths or `overrides`), or is `preset`'s when given.
    `dtype` (default float32, as the release) sets the stored parameter dtype; `config_overrides` set AF2Config
    fields (max_windows...). Every key is accounted for (ConversionError names the others).
    """
    import jax.numpy as jnp

    from af2_jax.convert.af2_shapes import infer_config
    from af2_jax.models.af2 import af2_preset

    release = open_release(src)
    source = release.source
    dtype = getattr(jnp, dtype) if isinstance(dtype, str) else dtype
    dtypes = {} if dtype is None else {"param_dtype": dtype}
    if preset:
        name = preset
        config = af2_preset(preset, **dtypes, **config_overrides)
        if EMBED_KEY in source.keys():  # the release's vocabulary (the reference resizes it to its tokenizer)
            config = dataclasses.replace(config, llm=dataclasses.replace(
                config.llm, vocab_size=int(source.shape(EMBED_KEY)[0])))
    else:
        config, name = infer_config(source, overrides=overrides, **dtypes, **config_overrides)
    shapes = param_shapes(config)
    targets = {path: (s.shape, s.dtype) for path, s in shapes.items()}
    keys = source.keys()
    with _progress_bar(len(keys), f"reading {Path(src).name}", progress) as bar:
        params = import_tensors(af2_rules(config), source, targets, progress=lambda key: bar.update())
    report = {"source": release.description, "preset": name or "none (sizes from the checkpoint's shapes)",
              "keys_read": len(keys),
              "clap_checkpoint_keys_ignored": release.clap_keys_ignored,
              "clap_keys_overridden_by_safe_ckpt": release.clap_keys_overridden,
              "parameters": len(params)}
    return config, params, report


def export_state_dict(config, params: Mapping[str, Any]):
    """(reference key, numpy array) for the reference's whole state dict, aliases included."""
    if config.audio_time_embedding:
        raise ValueError("the model adds an audio time embedding (AF2Config.audio_time_embedding), which NVIDIA's "
                         "AF2 PyTorch code does not have: there its weights would compute different outputs")
    return export_tensors(af2_rules(config), {k: np.asarray(v) for k, v in params.items()})


def write_clap_checkpoint(config, params: Mapping[str, Any], path: str | Path) -> int:
    """The HTSAT weights as an AF-CLAP-style torch file {'state_dict': {'module.audio_branch.<key>': tensor}}, which
    the reference's CLAP loader reads before safe_ckpt (tensors only: loadable with weights_only=True). Returns the
    number of tensors written."""
    import torch

    state = {CLAP_CKPT_PREFIX + key[len(CLAP_PREFIX):]: torch.from_numpy(np.array(value, order="C"))
             for key, value in export_state_dict(config, params) if key.startswith(CLAP_PREFIX)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, str(path))
    return len(state)


def export_release(config, params: Mapping[str, Any], dst: str | Path, *, max_chunk_bytes: int = CHUNK_BYTES,
                   progress: bool = True) -> list[Path]:
    """Writes dst/safe_ckpt/model_chunk_{n}.safetensors and metadata.json {chunk name: [keys]}."""
    safe_dir = Path(dst) / "safe_ckpt"
    if safe_dir.exists() and any(safe_dir.iterdir()):
        raise FileExistsError(f"{safe_dir}: already exists and is not empty; export into an empty directory")
    tensors = export_state_dict(config, params)  # refuses a model the reference cannot run, before writing
    safe_dir.mkdir(parents=True, exist_ok=True)
    chunks: dict[str, list[str]] = {}
    pending: dict[str, np.ndarray] = {}
    pending_bytes = 0

    def flush():
        nonlocal pending, pending_bytes
        name = f"model_chunk_{len(chunks)}"
        save_file(pending, str(safe_dir / f"{name}.safetensors"), metadata={"format": "pt"})
        chunks[name] = sorted(pending)
        pending, pending_bytes = {}, 0

    with _progress_bar(None, f"writing {safe_dir}", progress) as bar:
        for key, value in tensors:
            value = np.array(value, order="C")  # (np.ascontiguousarray would turn a 0-d counter into shape (1,))
            if pending and pending_bytes + value.nbytes > max_chunk_bytes:
                flush()
            pending[key] = value
            pending_bytes += value.nbytes
            bar.update()
    if pending or not chunks:
        flush()
    (safe_dir / METADATA_FILE).write_text(json.dumps(chunks, indent=1) + "\n")
    return [safe_dir / f"{name}.safetensors" for name in chunks]


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def import_tokenizer(tokenizer_dir: str | Path, config):
    """The HF tokenizer directory with AF2's special tokens added if absent; the config's token ids taken from it.

    Raises ValueError when the tokenizer's size differs from the checkpoint's vocabulary (the reference resizes the
    embeddings to len(tokenizer), so they must agree)."""
    from af2_jax.tokenizer import AF2Tokenizer, with_token_ids

    tokenizer = AF2Tokenizer.from_dir(tokenizer_dir)
    if len(tokenizer) != config.llm.vocab_size:
        raise ValueError(f"{tokenizer_dir}: tokenizer has {len(tokenizer)} tokens (AF2 special tokens included) but "
                         f"the checkpoint's embedding has {config.llm.vocab_size} rows")
    return tokenizer, with_token_ids(config, tokenizer)
