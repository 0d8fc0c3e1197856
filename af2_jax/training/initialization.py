"""Where a run's model comes from: the model config (preset + the run's dtype, remat, windows, tokenizer), and the
initial weights (`config.init_from`).

`init_from` is '' (random init, tiny presets) or a comma-separated list of sources applied in order, each
`[PREFIX=]PATH`, where PATH is
  - a directory in our pretrained format (af2_jax.pretrained; e.g. a converted NVIDIA AF2, Qwen2.5 or AF-CLAP
    checkpoint); with PREFIX its parameters land under PREFIX/ (`llm=/ckpt/qwen2.5-3b,htsat=/ckpt/af-clap`);
  - the workdir of a previous stage: its exported `final/` model if the run finished, otherwise its newest
    checkpoint's trained parameters laid over that run's own `init_from` (a partial restore).
Every loaded array must match a model parameter's path and shape. Frozen parameters must all be loaded unless the
run starts from random weights: a frozen random LLM would train nothing useful, silently.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.training.stages import path_string, variable_paths

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
RUN_CONFIG_FILE = "config.json"  # the run's ml_collections config, written into its workdir


def model_config(model_cfg: Any, *, max_windows: int, tokenizer: Any = None):
    """AF2Config from the run config's `model` block; special-token ids (and for the tiny presets the vocabulary
    size) follow the tokenizer."""
    from af2_jax.models.af2 import af2_preset

    config = af2_preset(model_cfg.preset, dtype=DTYPES[model_cfg.compute_dtype], param_dtype=jnp.float32,
                        remat_policy=model_cfg.remat_policy, scan_unroll=model_cfg.scan_unroll,
                        max_windows=max_windows,
                        audio_time_embedding=bool(model_cfg.get("audio_time_embedding", False)))
    depths = tuple(model_cfg.get("htsat_depths", ()) or ())
    if depths:  # a shallower HTSAT of the same widths (tests, CPU runs); still 64 tokens per window
        config = dataclasses.replace(config, htsat=dataclasses.replace(config.htsat, depths=depths))
    if tokenizer is None:
        return config
    vocab = len(tokenizer)
    if vocab != config.llm.vocab_size:
        if not model_cfg.vocab_from_tokenizer:
            raise ValueError(f"tokenizer has {vocab} tokens, model preset {model_cfg.preset!r} has "
                             f"{config.llm.vocab_size}; set model.vocab_from_tokenizer=True to resize the model")
        config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, vocab_size=vocab))
    return dataclasses.replace(config, audio_token_id=tokenizer.audio_id, eoc_token_id=tokenizer.eoc_id,
                               pad_token_id=tokenizer.pad_id, sep_token_id=tokenizer.sep_id,
                               eos_token_id=tokenizer.eos_id)


def model_factory(config: Any, seed: int):
    """A zero-argument constructor of the model (used under jit / eval_shape)."""
    from af2_jax.models.af2 import AF2Model
    return lambda: AF2Model(config, rngs=nnx.Rngs(seed))


def _is_pretrained_dir(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() and (path / "params").is_dir()


def read_source(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Flat '/'-pathed host arrays of one source directory (see the module docstring)."""
    from af2_jax import pretrained
    from af2_jax.training.checkpointing import Checkpointer

    path = pathlib.Path(path)
    if _is_pretrained_dir(path):
        return {k: np.asarray(v) for k, v in pretrained.load(path)[1].items()}
    if _is_pretrained_dir(path / "final"):
        return read_source(path / "final")
    run_config = path / RUN_CONFIG_FILE
    if (path / "checkpoints").is_dir() and run_config.is_file():
        base = read_init_from(json.loads(run_config.read_text()).get("init_from", ""))
        checkpointer = Checkpointer(path / "checkpoints")
        try:
            trained = checkpointer.read_params()
        finally:
            checkpointer.close()
        logging.info("init_from %s: %d trained arrays from checkpoint %s over %d from its init_from", path,
                     len(trained), checkpointer.latest_step(), len(base))
        return {**base, **trained}
    raise FileNotFoundError(f"init_from {path}: neither a pretrained-format directory (config.json + params/) nor "
                            f"a training workdir (final/, or checkpoints/ + {RUN_CONFIG_FILE})")


def read_init_from(init_from: str) -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for entry in filter(None, (e.strip() for e in init_from.split(","))):
        prefix, _, path = entry.rpartition("=")
        arrays = read_source(path)
        flat.update({(f"{prefix}/{k}" if prefix else k): v for k, v in arrays.items()})
    return flat


def covers(trees: Mapping[str, Any], flat: Mapping[str, np.ndarray]) -> bool:
    """Whether `flat` holds an array for every variable of `trees` (name -> nnx.State)."""
    return all(p in flat for tree in trees.values() for p in variable_paths(tree))


def apply_params(trees: Mapping[str, Any], shardings: Mapping[str, Any], flat: Mapping[str, np.ndarray], *,
                 require_frozen: bool) -> dict[str, Any]:
    """Replaces the leaves of `trees` (name -> nnx.State: trainable, batch_stats, frozen) found in `flat` by those
    arrays, cast to the leaf's dtype and placed with its sharding (each host reads only its shards' slices)."""
    unused = set(flat)
    missing_frozen = []
    out = {}
    for name, tree in trees.items():
        def load(path, leaf, sharding, name=name):
            key = path_string(path)
            if key not in flat:
                if name == "frozen" and isinstance(leaf, nnx.Param):
                    missing_frozen.append(key)
                return leaf
            unused.discard(key)
            value = flat[key]
            if tuple(value.shape) != tuple(leaf.get_value().shape):
                raise ValueError(f"init_from: {key} has shape {value.shape}, the model expects "
                                 f"{leaf.get_value().shape}")
            value = np.asarray(value).astype(leaf.get_value().dtype)
            return leaf.replace(jax.make_array_from_callback(value.shape, sharding, lambda index: value[index]))
        out[name] = jax.tree_util.tree_map_with_path(load, tree, shardings[name],
                                                     is_leaf=lambda x: isinstance(x, nnx.Variable))
    if unused:
        raise ValueError(f"init_from: {len(unused)} arrays match no model variable: {sorted(unused)[:20]}")
    if require_frozen and missing_frozen:
        raise ValueError(f"init_from: {len(missing_frozen)} frozen parameters are not loaded (they would stay "
                         f"random): {missing_frozen[:20]}")
    return out
