"""Where a run's model comes from: the model config (preset + the run's dtype, remat, windows, tokenizer), and the
initial weights (`config.init_from`).

`init_from` is '' (random init, tiny presets) or a comma-separated list of sources applied in order, each
`[PREFIX=]PATH`, where PATH is
  - a directory in our pretrained format (af2_jax.pretrained; e.g. a converted NVIDIA AF2, Qwen2.5 or AF-CLAP
    checkpoint); with PREFIX its parameters land under PREFIX/ (`llm=/ckpt/qwen2.5-3b,htsat=/ckpt/af-clap`).
    When the source's model itself has a PREFIX/ subtree, only that subtree is taken, so `htsat=<AF-CLAP model>`
    loads the AF-CLAP model's `htsat/*` (its audio half, AF2's HTSAT by construction) into AF2's `htsat/*` and
    leaves its T5, projections and logit scales; `htsat=` or `llm=` of another AF2 model takes that component;
  - the workdir of a previous stage: its exported `final/` model if the run finished, otherwise its newest
    checkpoint's trained parameters laid over that run's own `init_from` (a partial restore).
Every loaded array must match a model parameter's path and shape. Frozen parameters must all be loaded unless the
run starts from random weights: a frozen random LLM would train nothing useful, silently.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax import param_tree
from af2_jax.param_tree import path_string, variable_paths

class InitFromError(ValueError):
    """`init_from` arrays that do not fit the run's model; the message names them."""


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_config(model_cfg: Any, *, max_windows: int, tokenizer: Any = None):
    """AF2Config from the run config's `model` block; special-token ids (and for the tiny presets the vocabulary
    size) follow the tokenizer."""
    from af2_jax.models.af2 import af2_preset
    from af2_jax.tokenizer import with_token_ids

    config = af2_preset(model_cfg.preset, dtype=DTYPES[model_cfg.compute_dtype], param_dtype=jnp.float32,
                        remat_policy=model_cfg.remat_policy, scan_unroll=model_cfg.scan_unroll,
                        max_windows=max_windows,
                        audio_time_embedding=bool(model_cfg.audio_time_embedding))
    htsat = dict(remat_policy=model_cfg.get("htsat_remat_policy", "none"))  # run configs before the field: none
    if tuple(model_cfg.htsat_depths):  # a shallower HTSAT of the same widths (tests, CPU runs); still 64 tokens
        htsat["depths"] = tuple(model_cfg.htsat_depths)
    at_remat = model_cfg.get("audio_transformer_remat_policy", "none")
    config = dataclasses.replace(config, htsat=dataclasses.replace(config.htsat, **htsat),
                                 audio_transformer=dataclasses.replace(config.audio_transformer, remat_policy=at_remat))
    if tokenizer is None:
        return config
    vocab = len(tokenizer)
    if vocab != config.llm.vocab_size:
        if not model_cfg.vocab_from_tokenizer:
            raise InitFromError(f"tokenizer has {vocab} tokens, model preset {model_cfg.preset!r} has "
                             f"{config.llm.vocab_size}; set model.vocab_from_tokenizer=True to resize the model")
        config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, vocab_size=vocab))
    return with_token_ids(config, tokenizer)


def model_factory(config: Any, seed: int):
    """A zero-argument constructor of the model (used under jit / eval_shape)."""
    from af2_jax.models.af2 import AF2Model
    return lambda: AF2Model(config, rngs=nnx.Rngs(seed))


def random_init_params(run: Any) -> dict[str, np.ndarray]:
    """Every variable of the model a run config builds, as its random initialisation made them (jitted, as
    `train_state.create_train_state` does, so the values are the same), frozen Params in the run's frozen dtype.
    What a run that started from random weights froze is this, and never saved."""
    import ml_collections

    from af2_jax.training import tasks
    from af2_jax.training.train_state import cast_frozen_params

    cfg = ml_collections.ConfigDict({"task": "af2", **run})  # runs from before the task field trained AF2
    task = tasks.task_of(cfg)
    make = task.build(task.model_config(cfg, task.tokenizer(cfg)), cfg.seed)
    state = jax.jit(lambda: cast_frozen_params(nnx.state(make(), nnx.Not(nnx.RngState)),
                                               DTYPES[cfg.frozen_param_dtype]))()
    return {k: np.asarray(v) for k, v in param_tree.model_params(state).items()}


def read_source(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Flat '/'-pathed host arrays of one source directory (see the module docstring)."""
    from af2_jax import pretrained
    from af2_jax.training import feature_norm
    from af2_jax.training.checkpointing import Checkpointer

    path = pathlib.Path(path)
    if pretrained.is_model_dir(path) or pretrained.is_model_dir(path / pretrained.FINAL_DIR):
        return pretrained.load(path)[1]
    if (path / pretrained.CHECKPOINT_DIR).is_dir() and pretrained.run_config_file(path) is not None:
        run = pretrained.read_run_config(path)
        base = read_init_from(run.get("init_from", ""))
        checkpointer = Checkpointer(path / pretrained.CHECKPOINT_DIR)
        try:
            trained = checkpointer.read_params()
        finally:
            checkpointer.close()
        if (path / feature_norm.FILE).is_file():  # calibrated frozen values live beside the checkpoints
            trained = {**feature_norm.as_params(feature_norm.load(path)), **trained}
        arrays = {**base, **trained}
        random = random_init_params(run)
        missing = [k for k in random if k not in arrays]
        if missing:  # that run started (partly) from random weights: regenerate them from its seed
            arrays = {**{k: random[k] for k in missing}, **arrays}
        logging.info("init_from %s (unfinished): %d trained arrays from checkpoint %s over %d from its init_from "
                     "and %d regenerated from its seed", path, len(trained), checkpointer.latest_step(), len(base),
                     len(missing))
        return arrays
    raise FileNotFoundError(f"init_from {path}: neither a pretrained-format directory (config.json + params/) nor "
                            f"a training workdir (final/, or {pretrained.CHECKPOINT_DIR}/ + "
                            f"{pretrained.RUN_CONFIG_FILE})")


def read_init_from(init_from: str) -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for entry in filter(None, (e.strip() for e in init_from.split(","))):
        prefix, _, path = entry.rpartition("=")
        arrays = read_source(path)
        inside = f"{prefix}/"
        if prefix and any(k.startswith(inside) for k in arrays):  # a whole model holding that component
            taken = {k[len(inside):]: v for k, v in arrays.items() if k.startswith(inside)}
            logging.info("init_from %s=%s: its %s subtree (%d arrays; %d others left)", prefix, path, inside,
                         len(taken), len(arrays) - len(taken))
            arrays = taken
        flat.update({(f"{prefix}/{k}" if prefix else k): v for k, v in arrays.items()})
    return flat


def covers(trees: Mapping[str, Any], flat: Mapping[str, np.ndarray]) -> bool:
    """Whether `flat` holds an array for every variable of `trees` (name -> nnx.State)."""
    return all(p in flat for tree in trees.values() for p in variable_paths(tree))


def apply_params(trees: Mapping[str, Any], shardings: Mapping[str, Any], flat: Mapping[str, np.ndarray], *,
                 random_frozen_ok: Sequence[str] = ()) -> dict[str, Any]:
    """Replaces the leaves of `trees` (name -> nnx.State: trainable, batch_stats, frozen) found in `flat` by those
    arrays, cast to the leaf's dtype and placed with its sharding (each host reads only its shards' slices). A
    frozen Param missing from `flat` is an error unless its path matches a pattern of `random_frozen_ok` (the tiny
    recipe's LLM, random by design)."""
    from af2_jax.training.stages import PathMatcher

    random_ok = PathMatcher(random_frozen_ok)
    unused = set(flat)
    missing_frozen = []
    out = {}
    for name, tree in trees.items():
        def load(path, leaf, sharding, name=name):
            key = path_string(path)
            if key not in flat:
                if name == "frozen" and isinstance(leaf, nnx.Param) and not random_ok(key):
                    missing_frozen.append(key)
                return leaf
            unused.discard(key)
            value = flat[key]
            if tuple(value.shape) != tuple(leaf.get_value().shape):
                raise InitFromError(f"init_from: {key} has shape {value.shape}, the model expects "
                                 f"{leaf.get_value().shape}")
            value = np.asarray(value).astype(leaf.get_value().dtype)
            return leaf.replace(jax.make_array_from_callback(value.shape, sharding, lambda index: value[index]))
        out[name] = jax.tree_util.tree_map_with_path(load, tree, shardings[name],
                                                     is_leaf=lambda x: isinstance(x, nnx.Variable))
    if unused:
        raise InitFromError(f"init_from: {len(unused)} arrays match no model variable: {sorted(unused)[:20]}")
    if missing_frozen:
        raise InitFromError(f"init_from: {len(missing_frozen)} frozen parameters are not loaded (they would stay "
                            f"random): {missing_frozen[:20]}")
    return out
