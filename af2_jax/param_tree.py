"""Parameter trees and their paths: the one place where models, `nnx.State`s and pytrees become flat dicts keyed by
'/'-joined paths ('htsat/stages/0/blocks/attn/qkv/kernel') and back.

Every other layer (training, checkpoints, our on-disk format, the converters, benchmarks) goes through these
functions, so a path means the same everywhere. Nothing here imports a model, a converter or the training code.

    path_string(key_path)         a pytree / NNX key path -> 'a/b/0/c'
    flatten(tree) / unflatten()   nested dict <-> flat dict ('/' keys; digit parts come back as int list indices)
    nest(flat)                    flat dict -> nested dict with string keys (Orbax names arrays by tree path)
    to_pure(tree) / from_pure()   any pytree holding nnx.Variables <-> nested dict of arrays (checkpoints)
    abstract_model(build)         the model with ShapeDtypeStruct variables (nothing allocated)
    model_params(x)               a model, its state, a nested or flat dict -> flat dict of its variables
    check_params(where, ...)      names every missing, unexpected and mis-shaped parameter (ConversionError)
    model_from_flat(abstract, flat)   a model filled from a flat dict
    param_targets(module)         flat path -> (shape, dtype), what a converter fills
    load_flat(module, arrays)     some of a module's variables replaced in place
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx


class ConversionError(ValueError):
    """Parameters that do not match a model (or a conversion that does not account for every key); the message
    names each offending key, grouped by problem."""

    def __init__(self, problems: Mapping[str, Sequence[str]]):
        self.problems = {k: list(v) for k, v in problems.items() if v}
        lines = []
        for kind, items in self.problems.items():
            lines.append(f"{len(items)} {kind}:")
            lines.extend(f"  {item}" for item in items)
        super().__init__("\n".join(lines) if lines else "conversion error")


def path_string(path: Sequence[Any]) -> str:
    """An NNX / pytree key path as our '/'-joined parameter path."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
            if hasattr(p, attr):
                p = getattr(p, attr)
                break
        parts.append(str(p))
    return "/".join(parts)


def leaf_path_string(path: Sequence[Any]) -> str:
    """The '/'-path of an array leaf, also when a tree_map over nnx.State reaches it below a Variable's 'value'."""
    return path_string([p for p in path if getattr(p, "name", None) != "value"])


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_paths(tree: Any) -> list[str]:
    """The '/'-paths of every nnx.Variable in `tree` (an nnx.State or a pytree holding Variables)."""
    return [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]]


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict (e.g. `nnx.State.to_pure_dict()`) -> {'a/b/0/c': leaf}."""
    flat = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten(v, path + "/"))
        else:
            flat[path] = v
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of `flatten`; all-digit path parts become int keys (nnx.List indices), as `replace_by_pure_dict`
    expects."""
    tree: dict = {}
    for path, v in flat.items():
        parts = [int(p) if p.isdigit() else p for p in path.split("/")]
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def nest(flat: Mapping[str, Any]) -> dict:
    """Flat '/'-paths -> nested dict with string keys only (Orbax keys must match exactly between save and
    restore, so list indices stay strings here)."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def to_pure(tree: Any) -> dict:
    """Any pytree (nnx.State, optax state, dicts) -> nested dict of str keys with array leaves; nodes without leaves
    (optax's MaskedNode / EmptyState) disappear and come back from the abstract target in `from_pure`."""
    pure: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]:
        node = pure
        keys = [path_string([p]) for p in path]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf.get_value() if _is_variable(leaf) else leaf
    return pure


def from_pure(pure: Mapping, abstract: Any) -> Any:
    """Inverse of `to_pure`: the arrays of `pure` put back into the structure (and Variables) of `abstract`."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=_is_variable)
    leaves = []
    for path, leaf in paths_leaves:
        value: Any = pure
        for p in path:
            value = value[path_string([p])]
        leaves.append(leaf.replace(value) if _is_variable(leaf) else value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract_model(build: Callable[[], nnx.Module]) -> nnx.Module:
    """`build()`'s model with ShapeDtypeStruct variables: shapes and dtypes, no memory, no random draws."""
    return nnx.eval_shape(build)


def model_params(params: Any) -> dict[str, Any]:
    """A model, its nnx.State, a nested pure dict or a flat dict -> flat '/'-keyed dict of its variables (RNG
    state excluded: it is not a weight)."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Not(nnx.RngState))
    if isinstance(params, nnx.State):
        params = params.to_pure_dict()
    return flatten(params)


def check_params(where: str, expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    """Raises ConversionError naming every path of `expected` missing from `got`, every unexpected one and every
    mis-shaped one (values are anything with a shape)."""
    problems = {
        "missing parameters": [p for p in expected if p not in got],
        "unexpected parameters": [p for p in got if p not in expected],
        "mis-shaped parameters": [f"{p}: got {tuple(np.shape(v))}, expected {tuple(np.shape(expected[p]))}"
                                  for p, v in got.items() if p in expected
                                  and tuple(np.shape(v)) != tuple(np.shape(expected[p]))],
    }
    if any(problems.values()):
        raise ConversionError({f"{kind} ({where})": items for kind, items in problems.items()})


def model_from_flat(abstract: nnx.Module, flat: Mapping[str, Any]) -> nnx.Module:
    """The model of `abstract` (see `abstract_model`) with every variable taken from `flat` (checked first)."""
    graphdef, state = nnx.split(abstract)
    check_params("model_from_flat", model_params(state), flat)
    state.replace_by_pure_dict(unflatten(flat))
    return nnx.merge(graphdef, state)


def param_targets(module: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat path -> (shape, dtype) of every variable of `module` (concrete, or abstract from `abstract_model`): the
    arrays a converter's `import_tensors` fills."""
    return {path: (tuple(v.shape), np.dtype(v.dtype)) for path, v in model_params(module).items()}


def load_flat(module: nnx.Module, arrays: Mapping[str, Any]) -> None:
    """Writes a flat {path: array} dict (all or some of the variables) into `module` in place; every path must
    exist."""
    state = nnx.state(module)
    unknown = sorted(set(arrays) - set(flatten(state.to_pure_dict())))
    if unknown:
        raise KeyError(f"paths not in the module: {unknown}")
    nnx.replace_by_pure_dict(state, unflatten(arrays))
    nnx.update(module, state)
