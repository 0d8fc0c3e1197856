"""Hugging Face `Qwen2ForCausalLM` checkpoints <-> our `Qwen2ForCausalLM` flat params: one table, both ways.

HF keys: `model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}`, `...o_proj.weight`,
`...mlp.{gate,up,down}_proj.weight`, `...{input,post_attention}_layernorm.weight`, `model.norm.weight` and
`lm_head.weight`. With tied embeddings `lm_head.weight` is an alias of the embedding: optional on import (must equal
it when present) and not written on export, as `save_pretrained` does. Qwen2's rotary `inv_freq` is not persistent,
so there are no derived buffers.

`qwen2_layer_rules(ours_prefix, theirs_prefix)` is the per-layer table on its own, so AF2's converter can map
`lang_encoder.model.layers.{i}.decoder_layer.` onto its own stacked `llm/...` paths.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax import param_tree
from af2_jax.convert.mapping import (IDENTITY, LINEAR, Alias, Rule, Tensor, export_tensors,
                                     import_tensors)
from af2_jax.convert.tensor_files import SafetensorsSource, ShardedSafetensorsWriter
from af2_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

# (our module path, HF module path, has bias) for the Linear layers of one decoder layer
_LAYER_LINEARS = (
    ("self_attn/q_proj", "self_attn.q_proj", True),
    ("self_attn/k_proj", "self_attn.k_proj", True),
    ("self_attn/v_proj", "self_attn.v_proj", True),
    ("self_attn/o_proj", "self_attn.o_proj", False),
    ("mlp/gate_proj", "mlp.gate_proj", False),
    ("mlp/up_proj", "mlp.up_proj", False),
    ("mlp/down_proj", "mlp.down_proj", False),
)
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def qwen2_layer_rules(ours_prefix: str = "layers/", theirs_prefix: str = "model.layers.{i}.") -> list[Rule]:
    """Rules of one decoder layer. A placeholder that appears only in `theirs_prefix` (`{i}`) indexes the stacked
    leading axis of our arrays."""
    rules: list[Rule] = []
    for ours, theirs, bias in _LAYER_LINEARS:
        rules.append(Tensor(f"{ours_prefix}{ours}/kernel", f"{theirs_prefix}{theirs}.weight", LINEAR))
        if bias:
            rules.append(Tensor(f"{ours_prefix}{ours}/bias", f"{theirs_prefix}{theirs}.bias", IDENTITY))
    for norm in _LAYER_NORMS:
        rules.append(Tensor(f"{ours_prefix}{norm}/scale", f"{theirs_prefix}{norm}.weight", IDENTITY))
    return rules


def qwen2_rules(config: Qwen2Config, prefix: str = "", *, ours_prefix: str = "") -> list[Rule]:
    """The whole model's table. `prefix` goes before every HF key (e.g. 'lang_encoder.'), `ours_prefix` before
    every one of our paths (e.g. 'llm/')."""
    embed = f"{prefix}model.embed_tokens.weight"
    rules: list[Rule] = [
        Tensor(f"{ours_prefix}embed_tokens/embedding", embed, IDENTITY),
        Tensor(f"{ours_prefix}norm/scale", f"{prefix}model.norm.weight", IDENTITY),
        *qwen2_layer_rules(f"{ours_prefix}layers/", f"{prefix}model.layers.{{i}}."),
    ]
    if config.tie_word_embeddings:
        rules.append(Alias(f"{prefix}lm_head.weight", same_as=embed, export=False))
    else:
        rules.append(Tensor(f"{ours_prefix}lm_head/kernel", f"{prefix}lm_head.weight", LINEAR))
    return rules


def param_shapes(config: Qwen2Config) -> dict[str, jax.ShapeDtypeStruct]:
    """Our flat path -> shape/dtype of every parameter, without allocating the model."""
    return param_tree.model_params(param_tree.abstract_model(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))))


def num_hf_tensors(config: Qwen2Config) -> int:
    """How many tensors an HF checkpoint of this config holds (for progress bars)."""
    per_layer = sum(2 if bias else 1 for *_, bias in _LAYER_LINEARS) + len(_LAYER_NORMS)
    return 2 + per_layer * config.num_layers + (0 if config.tie_word_embeddings else 1)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def read_hf_config(src_dir: str | Path, **overrides) -> Qwen2Config:
    path = Path(src_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected an HF Qwen2 checkpoint directory)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
        return Qwen2Config.from_hf(hf, **overrides)
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def import_hf(src_dir: str | Path, *, dtype: Any = None, progress: bool = True
              ) -> tuple[Qwen2Config, dict[str, np.ndarray]]:
    """Reads an HF Qwen2 directory (config.json + model.safetensors or sharded with an index) tensor by tensor.

    Params are stored in `dtype`, by default the checkpoint's own dtype (`dtype`/`torch_dtype` in config.json),
    which the returned config records as `param_dtype`; each array is preallocated once and filled in place.
    """
    src_dir = Path(src_dir)
    dtype = getattr(jnp, dtype) if isinstance(dtype, str) else dtype
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir}: no such directory")
    config = read_hf_config(src_dir, **({} if dtype is None else {"param_dtype": dtype}))
    source = SafetensorsSource.from_dir(src_dir)
    targets = {path: (s.shape, s.dtype) for path, s in param_shapes(config).items()}
    with _progress_bar(len(source.keys()), f"reading {src_dir.name}", progress) as bar:
        params = import_tensors(qwen2_rules(config), source, targets, progress=lambda key: bar.update())
    return config, params


def export_hf(config: Qwen2Config, flat_params: Mapping[str, Any], dst_dir: str | Path, *, dtype: Any = None,
              max_shard_bytes: int = 4 << 30, progress: bool = True) -> list[Path]:
    """Writes config.json and safetensors shards (+ index when more than one) that transformers loads.

    Tensors are written in `dtype`, by default `config.param_dtype` (the HF checkpoint dtype recorded on import),
    shard by shard, one tensor converted at a time.
    """
    dst_dir = Path(dst_dir)
    out_dtype = np.dtype(config.param_dtype if dtype is None else dtype)
    param_tree.check_params(f"export to {dst_dir}", param_shapes(config), flat_params)
    if dst_dir.is_dir() and any(dst_dir.glob("*.safetensors")):
        raise FileExistsError(f"{dst_dir}: already holds *.safetensors files; export into an empty directory")
    writer = ShardedSafetensorsWriter(dst_dir, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    with _progress_bar(num_hf_tensors(config), f"writing {dst_dir.name}", progress) as bar:
        for key, value in export_tensors(qwen2_rules(config), flat_params):
            writer.add(key, np.asarray(value).astype(out_dtype, copy=False))
            bar.update()
    files = writer.close()
    hf = config.to_hf()
    hf["dtype"] = out_dtype.name
    (dst_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return files
