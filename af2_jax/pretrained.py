"""Our on-disk format for pretrained models, written by every converter and read by training and inference.

A directory holding
- `config.json`: `{"model": "<kind>", "config": {<config dataclass fields>}}`; nested config dataclasses become
  nested objects, dtypes become their names ("float32", "bfloat16"), tuples become lists;
- `params/`: an Orbax `StandardCheckpointer` checkpoint of the *nested* pure dict of the model's variables (string
  keys, the '/'-separated paths of `mapping.flatten` split into levels). Nested rather than '/'-keyed because Orbax
  names arrays by their tree path; dtypes (fp32, bf16) are stored as given;
- anything else (a tokenizer, a README): ignored here.

`MODEL_KINDS` maps a kind to the module, config class and model class to use; entries are resolved lazily, so
loading a Qwen2 never imports AF2 and a new kind is one `register_model_kind(...)` line. Models are rebuilt with
`nnx.eval_shape` (no random weights materialised) and filled from the checkpoint.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax import sharding
from af2_jax.convert.mapping import ConversionError, flatten, unflatten

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """Where a kind's config dataclass and model class live; the model is built as `model(config, rngs=rngs)`."""

    module: str
    config_class: str
    model_class: str

    def resolve(self) -> tuple[type, Callable[..., nnx.Module]]:
        module = importlib.import_module(self.module)
        try:
            return getattr(module, self.config_class), getattr(module, self.model_class)
        except AttributeError as e:
            raise ImportError(f"model kind registry: {self.module} has no {e.name}") from None


MODEL_KINDS: dict[str, ModelKind] = {
    "qwen2": ModelKind("af2_jax.models.qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    "af2": ModelKind("af2_jax.models.af2", "AF2Config", "AF2Model"),
}


def register_model_kind(kind: str, module: str, config_class: str, model_class: str) -> None:
    MODEL_KINDS[kind] = ModelKind(module, config_class, model_class)


def kind_of(config: Any) -> str:
    """The registered kind whose config class is `type(config)` (matched by module and name, nothing imported)."""
    cls = type(config)
    for kind, entry in MODEL_KINDS.items():
        if entry.module == cls.__module__ and entry.config_class == cls.__qualname__:
            return kind
    raise KeyError(f"{cls.__module__}.{cls.__qualname__} is not a registered model config; "
                   f"register it with af2_jax.pretrained.register_model_kind")


# ---------------------------------------------------------------------------------------------------------------
# config (de)serialisation


def _is_dtype(value: Any) -> bool:
    return isinstance(value, np.dtype) or (isinstance(value, type) and hasattr(value, "dtype")
                                           and issubclass(np.dtype(value).type, np.generic))


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if _is_dtype(value):
        return jnp.dtype(value).name
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return value


def config_to_dict(config: Any) -> dict:
    """A config dataclass (possibly nesting others) -> JSON-ready dict."""
    return {f.name: _encode(getattr(config, f.name)) for f in dataclasses.fields(config)}


def dtype_from_name(name: str) -> Any:
    """'bfloat16' -> jnp.bfloat16 (the scalar type configs hold by default)."""
    if not hasattr(jnp, name):
        raise ValueError(f"unknown dtype {name!r}")
    return getattr(jnp, name)


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    for arg in typing.get_args(hint):  # Optional[SomeConfig], SomeConfig | None
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def _decode(value: Any, name: str, hint: Any, default: Any, where: str) -> Any:
    nested = _dataclass_in(hint)
    if nested is not None and isinstance(value, Mapping):
        return config_from_dict(nested, value, where=f"{where}.{name}")
    if isinstance(value, str) and (name.endswith("dtype") or _is_dtype(default)):
        return dtype_from_name(value)
    if isinstance(value, list) and (typing.get_origin(hint) is tuple or hint is tuple or isinstance(default, tuple)):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def config_from_dict(cls: type, data: Mapping[str, Any], *, where: str = "config") -> Any:
    """Inverse of `config_to_dict`; unknown fields are an error naming them, absent ones take their defaults.

    Fields holding dtypes must be named `*dtype` or default to a dtype."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs[name] = _decode(value, name, hints.get(name), default, where)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: cannot build {cls.__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# params


def _nest(flat: Mapping[str, Any]) -> dict:
    """'/'-paths -> nested dict with string keys (Orbax keys must match exactly between save and restore)."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _flat_params(params_or_model: Any) -> dict[str, Any]:
    if isinstance(params_or_model, nnx.Module):
        params_or_model = nnx.state(params_or_model, nnx.Not(nnx.RngState))
    if isinstance(params_or_model, nnx.State):
        params_or_model = params_or_model.to_pure_dict()
    return flatten(params_or_model)


def abstract_model(kind: str, config: Any) -> nnx.Module:
    """The model of `kind` with ShapeDtypeStruct variables (nothing allocated)."""
    _, build = MODEL_KINDS[kind].resolve()
    return nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0)))


def _expected_params(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    return flatten(nnx.state(model, nnx.Not(nnx.RngState)).to_pure_dict())


def _check_params(where: str, expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    problems = {
        "missing parameters": [p for p in expected if p not in got],
        "unexpected parameters": [p for p in got if p not in expected],
        "mis-shaped parameters": [f"{p}: got {tuple(np.shape(v))}, expected {tuple(expected[p].shape)}"
                                  for p, v in got.items() if p in expected
                                  and tuple(np.shape(v)) != tuple(expected[p].shape)],
    }
    if any(problems.values()):
        raise ConversionError({f"{kind} ({where})": items for kind, items in problems.items()})


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (not a pretrained model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def save(directory: str | os.PathLike, config: Any, params_or_model: Any, *, overwrite: bool = False) -> Path:
    """Writes `config.json` and `params/` into `directory` (other files there are left alone).

    `params_or_model` is an nnx model, its state, a nested pure dict or a flat '/'-keyed dict; it must match the
    model that `config` builds exactly (names and shapes), so that `load` can always rebuild it.
    """
    directory = Path(directory).absolute()
    kind = kind_of(config)
    params = _flat_params(params_or_model)
    _check_params(str(directory), _expected_params(abstract_model(kind, config)), params)
    params_dir = directory / PARAMS_DIR
    if params_dir.exists() and not overwrite:
        raise FileExistsError(f"{params_dir}: already exists (pass overwrite=True to replace it)")
    directory.mkdir(parents=True, exist_ok=True)
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(params_dir, _nest(params), force=overwrite)
    (directory / CONFIG_FILE).write_text(json.dumps({"model": kind, "config": config_to_dict(config)}, indent=2)
                                         + "\n")
    return directory


def read_config(directory: str | os.PathLike) -> tuple[str, Any]:
    """(kind, config) from `directory/config.json`."""
    path = Path(directory) / CONFIG_FILE
    data = _read_json(path)
    kind = data.get("model")
    if kind not in MODEL_KINDS:
        raise ValueError(f"{path}: unknown model kind {kind!r}; known kinds: {sorted(MODEL_KINDS)}")
    if not isinstance(data.get("config"), Mapping):
        raise ValueError(f"{path}: no 'config' object")
    config_cls, _ = MODEL_KINDS[kind].resolve()
    return kind, config_from_dict(config_cls, data["config"], where=f"{path}: config")


def _restore(directory: Path, kind: str, config: Any, mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: no such directory (not a pretrained model directory)")
    model = abstract_model(kind, config)
    expected = _expected_params(model)
    shardings = {}
    if mesh is not None:
        named = sharding.state_shardings(nnx.state(model, nnx.Not(nnx.RngState)), mesh)
        shardings = {"/".join(str(p) for p in path): s for path, s in nnx.to_flat_state(named)}
    with ocp.StandardCheckpointer() as checkpointer:
        saved = flatten(dict(checkpointer.metadata(params_dir).item_metadata))
        _check_params(str(params_dir), expected, saved)
        # the stored dtype wins, so fp32 and bf16 checkpoints come back as written
        target = {p: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=shardings.get(p)) for p, m in saved.items()}
        return flatten(checkpointer.restore(params_dir, _nest(target)))


def load(directory: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, dict[str, Any]]:
    """(config, flat '/'-keyed params). Host numpy arrays, or jax arrays sharded by their logical axes on `mesh`."""
    directory = Path(directory).absolute()
    kind, config = read_config(directory)
    return config, _restore(directory, kind, config, mesh)


def load_model(directory: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """The model, rebuilt abstractly and filled from the checkpoint (jax arrays; sharded when `mesh` is given)."""
    directory = Path(directory).absolute()
    kind, config = read_config(directory)
    params = _restore(directory, kind, config, mesh)
    if mesh is None:
        params = {p: jnp.asarray(v) for p, v in params.items()}
    graphdef, state = nnx.split(abstract_model(kind, config))
    state.replace_by_pure_dict(unflatten(params))
    return nnx.merge(graphdef, state)
