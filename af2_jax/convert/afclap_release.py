"""NVIDIA's AF-CLAP checkpoint <-> our AFCLAPModel: reading and writing the files. Used by `launch/convert.py
afclap-from-torch` / `afclap-to-torch`; the key table is `afclap_keys.py`.

The released `clap_ckpt/epoch_16.pt` is a LAION training checkpoint: `{'state_dict': {...}, 'optimizer': ...,
'epoch': ..., ...}`, every state-dict key prefixed with `module.` (DDP), the tied T5 embedding stored under both
`text_branch.shared.weight` and `text_branch.encoder.embed_tokens.weight`. NVIDIA's `load_afclap_ckpt` takes
`['state_dict']`, removes `module.` and loads with strict=True (afclap_reference.md sections 2 and 6), so:

- import reads a `.pt` (only through `torch.load(weights_only=True)`) or a `.safetensors`, the state dict at the
  top or under 'state_dict', with or without `module.`; other top-level entries (optimizer state, epoch) are
  ignored and counted in the report; the tied name is optional and, when present, must equal its twin;
- the config comes from the shapes (HTSAT as af2_shapes does for AF2; T5 vocabulary, width, heads from the
  relative-attention table, d_kv, layers, d_ff, buckets; the joint width), so any size converts; what no shape
  holds (T5's max distance, norm epsilons, dropout rates) is the preset default or an override;
- export writes `{'state_dict': {...}}` with `module.` and both tied names, in the reference's key order: a `.pt`
  of tensors only (loadable with weights_only=True), or a `.safetensors` of the same keys.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from af2_jax import param_tree
from af2_jax.convert import afclap_keys
from af2_jax.convert.af2_shapes import ShapeError, Shapes, htsat_fields
from af2_jax.convert.mapping import ConversionError, export_tensors, import_tensors
from af2_jax.convert.tensor_files import SafetensorsSource, UnreadableFileError, torch_to_numpy

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
STATE_DICT = "state_dict"


class TorchCheckpoint:
    """A torch checkpoint's state dict (at the top level or under 'state_dict'), read with
    `torch.load(weights_only=True)`; `ignored` names the other top-level entries (optimizer state, epoch...)."""

    def __init__(self, path: str | Path):
        import torch

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            try:
                obj = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                obj = torch.load(str(self.path), map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated, or holding objects weights_only refuses to unpickle
            raise UnreadableFileError(f"{self.path}: not a readable torch checkpoint "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(obj, Mapping):
            raise ValueError(f"{self.path}: expected a dict (a state dict or {{'{STATE_DICT}': ...}}), found "
                             f"{type(obj).__name__}")
        if isinstance(obj.get(STATE_DICT), Mapping):
            self.nested = True
            state, self.ignored = obj[STATE_DICT], sorted(str(k) for k in obj if k != STATE_DICT)
        else:
            self.nested = False
            state, self.ignored = obj, []
        not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if not_tensors:
            raise ValueError(f"{self.path}: the state dict holds entries that are not tensors: {not_tensors[:20]}")
        self._tensors = dict(state)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, key: str) -> np.ndarray:
        return torch_to_numpy(self._tensors[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)


def open_checkpoint(src: str | Path) -> tuple[Any, str, list[str]]:
    """(tensor source, description, ignored top-level entries) of a `.pt` or `.safetensors` file."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file")
    if src.suffix == ".safetensors":
        return SafetensorsSource([src]), f"safetensors file {src}", []
    if src.suffix in TORCH_SUFFIXES:
        checkpoint = TorchCheckpoint(src)
        where = f"under '{STATE_DICT}'" if checkpoint.nested else "at the top level"
        return checkpoint, f"torch file {src} (state dict {where})", checkpoint.ignored
    raise ValueError(f"{src}: unknown checkpoint file type (expected .safetensors or {', '.join(TORCH_SUFFIXES)})")


def key_prefix(keys: list[str]) -> str:
    """'module.' when every key carries DDP's prefix, else ''."""
    return afclap_keys.PREFIX if keys and all(k.startswith(afclap_keys.PREFIX) for k in keys) else ""


# ---------------------------------------------------------------------------------------------------------------
# the config a state dict's shapes imply


def _t5_fields(shape: Shapes, p: str) -> dict:
    shared, tied = f"{p}{afclap_keys.SHARED}", f"{p}{afclap_keys.TIED_EMBEDDING}"
    embedding = shared if shared in shape else tied  # a file may hold either name of the tied pair
    vocab, d_model = shape(embedding)
    # the table is (buckets, heads): the only shape that holds the head count (q's rows are heads x d_kv)
    buckets, heads = shape(f"{p}{afclap_keys.RELATIVE_BIAS}")
    inner = shape(f"{p}encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    if inner % heads:
        raise ShapeError(f"T5 attention width {inner} is not a multiple of the {heads} heads of the relative "
                         f"attention table")
    if f"{p}encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in shape:
        raise ShapeError("the T5 feed-forward has no wi_0/wi_1 (only Flan-T5's gated-GELU encoder is supported)")
    return dict(vocab_size=vocab, d_model=d_model, num_heads=heads, d_kv=inner // heads,
                num_layers=shape.count(rf"{re.escape(p)}encoder\.block\.(\d+)\."),
                d_ff=shape(f"{p}encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
                relative_attention_num_buckets=buckets)


def infer_config(source, prefix: str = afclap_keys.PREFIX, *, htsat: Mapping[str, Any] | None = None,
                 t5: Mapping[str, Any] | None = None, **fields) -> tuple[Any, str | None]:
    """(AFCLAPConfig, the preset it equals or None) from a tensor source's shapes. `htsat=` / `t5=` set sub-config
    fields no shape holds (t5=dict(relative_attention_max_distance=64)); other keywords are AFCLAPConfig fields;
    `dtype` / `param_dtype` apply to every sub-config too."""
    from af2_jax.models.afclap import AFCLAP_PRESETS, AFCLAPConfig, afclap_preset
    from af2_jax.models.htsat_config import HTSATConfig
    from af2_jax.models.t5 import T5Config

    shape = Shapes(source)
    dtypes = {k: fields[k] for k in ("dtype", "param_dtype") if k in fields}
    htsat_cfg = HTSATConfig(**{**htsat_fields(shape, prefix + afclap_keys.AUDIO_BRANCH), **dtypes, **(htsat or {})})
    t5_cfg = T5Config(**{**_t5_fields(shape, prefix + afclap_keys.TEXT_BRANCH), **dtypes, **(t5 or {})})
    joint = shape(f"{prefix}audio_projection.0.weight")[0]
    config = AFCLAPConfig(htsat=htsat_cfg, t5=t5_cfg, **{"joint_dim": joint, **fields})
    preset = next((name for name in AFCLAP_PRESETS if afclap_preset(name, **dtypes) == config), None)
    return config, preset


# ---------------------------------------------------------------------------------------------------------------
# import / export


def param_targets(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Our flat path -> (shape, dtype) of every variable, without allocating the model."""
    from flax import nnx

    from af2_jax.models.afclap import AFCLAPModel

    return param_tree.param_targets(param_tree.abstract_model(lambda: AFCLAPModel(config, rngs=nnx.Rngs(0))))


def import_afclap(src: str | Path, *, dtype: Any = None, progress: bool = True,
                  **overrides) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """(AFCLAPConfig, flat params, report) from an AF-CLAP checkpoint file (.pt or .safetensors).

    Every size comes from the shapes (`infer_config`; `overrides` as its keywords). `dtype` (default float32, as
    the checkpoint) is the stored parameter dtype. Every key is accounted for: a missing, unexpected or mis-shaped
    key, a tied embedding unequal to its twin, or a Swin buffer unequal to the recomputed one raises
    ConversionError naming each.
    """
    import jax.numpy as jnp
    from tqdm import tqdm

    source, description, ignored = open_checkpoint(src)
    keys = source.keys()
    if not keys:
        raise ConversionError({f"{src}: the state dict is empty": ["(no keys)"]})
    prefix = key_prefix(keys)
    if f"{prefix}{afclap_keys.AUDIO_BRANCH}patch_embed.proj.weight" not in keys:
        raise ConversionError({f"{src}: no '{prefix}{afclap_keys.AUDIO_BRANCH}*' keys (not an AF-CLAP "
                               f"checkpoint); its first keys": keys[:20]})
    dtype = getattr(jnp, dtype) if isinstance(dtype, str) else dtype
    if dtype is not None:
        overrides = {"param_dtype": dtype, **overrides}
    config, preset = infer_config(source, prefix, **overrides)
    rules = afclap_keys.afclap_rules(config, prefix)
    with tqdm(total=len(keys), desc=f"reading {Path(src).name}", unit="tensor", disable=not progress) as bar:
        params = import_tensors(rules, source, param_targets(config), progress=lambda key: bar.update())
    buffers = sum(1 for k in keys if k.endswith((".attn_mask", ".relative_position_index")))
    tied = f"{prefix}{afclap_keys.TEXT_BRANCH}{afclap_keys.TIED_EMBEDDING}"
    report = {
        "source": description,
        "preset": preset or "none (sizes from the checkpoint's shapes)",
        "keys_read": len(keys),
        "module_prefix": f"'{prefix}' on every key" if prefix else "none",
        "tied_embedding": "both names, equal" if tied in keys else "shared.weight only",
        "buffers_checked": buffers,
        "top_level_entries_ignored": f"{len(ignored)}" + (f" ({', '.join(ignored)})" if ignored else ""),
        "parameters": len(params),
    }
    return config, params, report


def export_state_dict(config, params: Mapping[str, Any], prefix: str = afclap_keys.PREFIX) -> dict[str, np.ndarray]:
    """The reference's whole state dict, tied name included, in `CLAP.state_dict()`'s key order."""
    exported = dict(export_tensors(afclap_keys.afclap_rules(config, prefix),
                                   {k: np.asarray(v) for k, v in params.items()}))
    order = afclap_keys.state_dict_keys(config, prefix)
    if set(order) != set(exported):  # the table and the order list describe one format: a bug if they disagree
        raise ConversionError({"keys written but not in the reference's key list": sorted(set(exported) - set(order)),
                               "reference keys not written": sorted(set(order) - set(exported))})
    return {key: np.asarray(exported[key]) for key in order}


def _to_torch(value: np.ndarray):
    import ml_dtypes
    import torch

    value = np.array(value, order="C")  # (a 0-d array stays 0-d)
    if value.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(value)


def export_afclap(config, params: Mapping[str, Any], path: str | Path, *, prefix: str = afclap_keys.PREFIX) -> int:
    """Writes the checkpoint NVIDIA's `load_afclap_ckpt` loads (strict): `{'state_dict': {...}}` to a `.pt`
    (tensors only), or the same keys to a `.safetensors`. Returns the number of keys written."""
    path = Path(path)
    if path.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise ValueError(f"{path}: unknown checkpoint file type (expected .pt or .safetensors)")
    state = export_state_dict(config, params, prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.array(v, order="C") for k, v in state.items()}, str(path), metadata={"format": "pt"})
    else:
        import torch

        shared = f"{prefix}{afclap_keys.TEXT_BRANCH}{afclap_keys.SHARED}"
        tied = f"{prefix}{afclap_keys.TEXT_BRANCH}{afclap_keys.TIED_EMBEDDING}"
        tensors: dict[str, Any] = {}
        for key, value in state.items():  # shared comes first; the tied name gets its storage, as in a tied model
            tensors[key] = tensors[shared] if key == tied else _to_torch(value)
        torch.save({STATE_DICT: tensors}, str(path))
    return len(state)
