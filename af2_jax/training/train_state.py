"""The train state: the model split into what trains, what changes without training and what stays fixed, plus
the optimizer state; built directly sharded on the mesh (never materialised on one device).

    trainable    nnx.State of the stage's trainable nnx.Params (fp32 master weights)       -> gradients, Adam
    batch_stats  nnx.State of nnx.BatchStat (HTSAT BatchNorm running statistics) and the     -> updated when HTSAT trains
                 BatchNorms' `num_batches_tracked` counters (Buffers the training forward increments)
    frozen       nnx.State of everything else (frozen Params, Buffers); may be stored bf16 -> passed through

`TrainState` = {'trainable', 'batch_stats', 'opt_state', 'step'} is what the step donates and what checkpoints hold;
`frozen` comes from `init_from` again on every (re)start.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from af2_jax import param_tree
from af2_jax import sharding as shd
from af2_jax.training import initialization, stages

TrainState = dict  # {'trainable': nnx.State, 'batch_stats': nnx.State, 'opt_state': optax state, 'step': int32}


@dataclasses.dataclass(frozen=True)
class ModelSplit:
    """How the model is split for one stage (static, hashable)."""

    graphdef: Any
    trainable_patterns: tuple[str, ...]

    def merge(self, trainable: nnx.State, batch_stats: nnx.State, frozen: nnx.State) -> nnx.Module:
        return nnx.merge(self.graphdef, trainable, batch_stats, frozen)


# what the forward pass updates in training mode: BatchNorm statistics and their torch-style call counters
MUTABLE = nnx.Any(nnx.BatchStat, nnx.PathContains("num_batches_tracked"))


def split_model(model: nnx.Module, trainable_patterns: Sequence[str]):
    """-> (ModelSplit, trainable, batch_stats, frozen)."""
    graphdef, trainable, batch_stats, frozen = nnx.split(
        model, stages.trainable_filter(trainable_patterns), MUTABLE, ...)
    return ModelSplit(graphdef, tuple(trainable_patterns)), trainable, batch_stats, frozen


def cast_frozen_params(frozen: nnx.State, dtype: Any) -> nnx.State:
    """Stores frozen floating-point Params in `dtype` (e.g. bf16: they need no fp32 master copy); Buffers keep
    their dtype so checkpoints round-trip exactly."""
    def cast(v):
        if isinstance(v, nnx.Param) and jnp.issubdtype(v.get_value().dtype, jnp.floating):
            return v.replace(v.get_value().astype(dtype))
        return v
    return jax.tree.map(cast, frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for any pytree holding nnx.Variables (params, Adam moments: sharded by their logical axis
    names) and plain arrays (step counters: replicated)."""
    mesh_shape = dict(mesh.shape)

    def one(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("out_sharding")
            return NamedSharding(mesh, shd.logical_to_spec(axes, jnp.shape(x.get_value()), mesh_shape))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _build(make_model: Callable[[], nnx.Module], trainable_patterns, tx: optax.GradientTransformation,
           frozen_dtype: Any):
    split, trainable, batch_stats, frozen = split_model(make_model(), trainable_patterns)
    state = {"trainable": trainable, "batch_stats": batch_stats, "opt_state": tx.init(trainable),
             "step": jnp.zeros((), jnp.int32)}
    return split, state, cast_frozen_params(frozen, frozen_dtype)


def abstract_train_state(make_model: Callable[[], nnx.Module], trainable_patterns: Sequence[str],
                         tx: optax.GradientTransformation, frozen_dtype: Any = jnp.float32):
    """-> (ModelSplit, abstract state, abstract frozen): shapes and dtypes only, no memory."""
    with nnx.use_eager_sharding(False):
        out = {}

        def build():
            split, state, frozen = _build(make_model, trainable_patterns, tx, frozen_dtype)
            out["split"] = split
            return state, frozen
        state, frozen = jax.eval_shape(build)
    stages.check_patterns_match(trainable_patterns, param_tree.variable_paths(nnx.merge_state(state["trainable"], frozen)))
    return out["split"], state, frozen


def create_train_state(make_model: Callable[[], nnx.Module], trainable_patterns: Sequence[str],
                       tx: optax.GradientTransformation, mesh: Mesh, frozen_dtype: Any = jnp.float32,
                       params: Mapping[str, np.ndarray] | None = None, random_frozen_ok: Sequence[str] = ()):
    """The train state created straight into its shardings on `mesh`: random initialisation inside jit, with the
    arrays of `params` (flat '/'-pathed, see `initialization.apply_params`; frozen parameters not in them must match
    `random_frozen_ok`) laid over it. When `params` holds every
    variable of the model, no random initialisation is compiled or run at all (a stage starting from the previous
    one's export).

    -> (ModelSplit, state, frozen, shardings) with shardings = (state shardings, frozen shardings).
    """
    split, abstract_state, abstract_frozen = abstract_train_state(make_model, trainable_patterns, tx, frozen_dtype)
    shardings = (tree_shardings(abstract_state, mesh), tree_shardings(abstract_frozen, mesh))

    def variables(state, frozen):
        return {"trainable": state["trainable"], "batch_stats": state["batch_stats"], "frozen": frozen}

    complete = bool(params) and initialization.covers(variables(abstract_state, abstract_frozen), params)
    if complete:
        state, frozen = abstract_state, abstract_frozen  # every leaf is replaced below
    else:
        def init():
            with nnx.use_eager_sharding(False):
                _, state, frozen = _build(make_model, trainable_patterns, tx, frozen_dtype)
            return state, frozen
        with jax.set_mesh(mesh):
            state, frozen = jax.jit(init, out_shardings=shardings)()
    if params:
        loaded = initialization.apply_params(variables(state, frozen), variables(*shardings), params,
                                             random_frozen_ok=random_frozen_ok)
        state = {**state, "trainable": loaded["trainable"], "batch_stats": loaded["batch_stats"]}
        frozen = loaded["frozen"]
    if complete:  # the optimizer state of the loaded weights
        with jax.set_mesh(mesh):
            state["opt_state"] = jax.jit(tx.init, out_shardings=shardings[0]["opt_state"])(state["trainable"])
            state["step"] = jax.device_put(jnp.zeros((), jnp.int32), shardings[0]["step"])
    return split, state, frozen, shardings
