"""Our on-disk format for models, written by every converter and by training, read by every command.

A model directory holds, always together:
- `config.json`: `{"model": "<kind>", "config": {<config dataclass fields>}}`; nested config dataclasses become
  nested objects, dtypes become their names ("float32", "bfloat16"), tuples become lists;
- `params/`: an Orbax `StandardCheckpointer` checkpoint of the *nested* pure dict of the model's variables (string
  keys, the '/'-separated paths of `param_tree.flatten` split into levels). Nested rather than '/'-keyed because
  Orbax names arrays by their tree path; dtypes (fp32, bf16) are stored as given, shardings are not relied on: a
  model saved on any mesh loads on any other, or on one device;
- `tokenizer/`: the tokenizer whose special-token ids the config holds (`AF2Tokenizer.save`), when the model has
  one (an AF2 model always should; a bare Qwen2 may not);
- anything else (a README, eval results): ignored here.

`resolve(path)` accepts a model directory, a training workdir (its exported `final/`) or that `final/` itself, so
every command takes any of them. A training workdir keeps its own run config in `run_config.json` (older runs:
`config.json` without a "model" key, still read).

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

from af2_jax import param_tree, sharding

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
# a training workdir (af2_jax/training/loop.py): the exported model, the checkpoints and the run's own config
FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG_FILE = "run_config.json"
LEGACY_RUN_CONFIG_FILE = "config.json"  # before run_config.json; told apart from a model's by its missing "model"


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
    "afclap": ModelKind("af2_jax.models.afclap", "AFCLAPConfig", "AFCLAPModel"),
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


def config_with_dtype(config: Any, dtype: Any) -> Any:
    """`config` with every `dtype` and `param_dtype` field, in it and in the configs it nests, set to `dtype` (a
    model served in bf16 computes and stores its weights in bf16)."""
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in ("dtype", "param_dtype"):
            changes[f.name] = dtype
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = config_with_dtype(value, dtype)
    return dataclasses.replace(config, **changes)


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
# model directories and workdirs


def _names_a_model(config_file: Path) -> bool:
    """Whether a config.json is a model's (it names a model kind) rather than a training run's."""
    try:
        data = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "model" in data


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a model in our format (a config.json naming a model kind, and params/)."""
    path = Path(path)
    return (path / PARAMS_DIR).is_dir() and _names_a_model(path / CONFIG_FILE)


def run_config_file(workdir: str | os.PathLike) -> Path | None:
    """A training workdir's run config (ml_collections JSON), or None if `workdir` is not one."""
    workdir = Path(workdir)
    if (workdir / RUN_CONFIG_FILE).is_file():
        return workdir / RUN_CONFIG_FILE
    legacy = workdir / LEGACY_RUN_CONFIG_FILE
    if legacy.is_file() and not _names_a_model(legacy):
        return legacy
    return None


def read_run_config(workdir: str | os.PathLike) -> dict:
    path = run_config_file(workdir)
    if path is None:
        raise FileNotFoundError(f"{workdir}: not a training workdir (no {RUN_CONFIG_FILE})")
    return _read_json(path)


def resolve(path: str | os.PathLike) -> Path:
    """The model directory that `path` names: itself, or a training workdir's exported `final/`. A workdir whose
    run has not finished has no model yet: the error says so (training's `init_from` accepts such a workdir)."""
    path = Path(path).absolute()
    if _names_a_model(path / CONFIG_FILE):  # a model directory (loading it says what, if anything, is wrong)
        return path
    if is_model_dir(path / FINAL_DIR):
        return path / FINAL_DIR
    if run_config_file(path) is not None:
        steps = sorted(int(p.name) for p in (path / CHECKPOINT_DIR).glob("*") if p.name.isdigit())
        where = f"its newest checkpoint is step {steps[-1]}" if steps else "it has no checkpoint"
        raise FileNotFoundError(f"{path}: a training workdir whose run has not finished ({where}, no {FINAL_DIR}/ "
                                f"model yet); re-run its training command to finish it")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    raise FileNotFoundError(f"{path}: not a model directory ({CONFIG_FILE} + {PARAMS_DIR}/) nor a training workdir "
                            f"with {FINAL_DIR}/")


def load_tokenizer(path: str | os.PathLike, override: str | os.PathLike | None = None):
    """The tokenizer of the model at `path` (anything `resolve` takes): `override` if given, else its `tokenizer/`.
    Models exported by training before tokenizers were saved with them fall back to their run's `tokenizer`
    setting, or the synthetic dataset's tiny tokenizer when that was empty (what that run trained with)."""
    from af2_jax import tokenizer

    model_dir = resolve(path)
    if read_config(model_dir)[0] == "afclap":  # AF-CLAP's text side is T5's tokenizer, not AF2's
        from af2_jax.clap_tokenizer import ClapTokenizer
        return ClapTokenizer.from_file(override or model_dir / TOKENIZER_DIR)
    if override:
        return tokenizer.AF2Tokenizer.from_dir(override)
    if (model_dir / TOKENIZER_DIR).is_dir():
        return tokenizer.AF2Tokenizer.from_dir(model_dir / TOKENIZER_DIR)
    if model_dir.name == FINAL_DIR and run_config_file(model_dir.parent) is not None:
        return tokenizer.load_tokenizer(read_run_config(model_dir.parent).get("tokenizer"))
    raise tokenizer.TokenizerError(f"{model_dir}: holds no {TOKENIZER_DIR}/; pass the tokenizer directory it was "
                                   f"trained with (--tokenizer DIR)")


# ---------------------------------------------------------------------------------------------------------------
# params


def abstract_model(kind: str, config: Any) -> nnx.Module:
    """The model of `kind` with ShapeDtypeStruct variables (nothing allocated)."""
    _, build = MODEL_KINDS[kind].resolve()
    return param_tree.abstract_model(lambda: build(config, rngs=nnx.Rngs(0)))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (not a pretrained model directory)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def save(directory: str | os.PathLike, config: Any, params_or_model: Any, *, tokenizer: Any = None,
         overwrite: bool = False) -> Path:
    """Writes `config.json`, `params/` and, given an `AF2Tokenizer`, `tokenizer/` into `directory` (other files
    there are left alone).

    `params_or_model` is an nnx model, its state, a nested pure dict or a flat '/'-keyed dict; it must match the
    model that `config` builds exactly (names and shapes), so that `load` can always rebuild it.
    """
    directory = Path(directory).absolute()
    kind = kind_of(config)
    params = param_tree.model_params(params_or_model)
    param_tree.check_params(str(directory), param_tree.model_params(abstract_model(kind, config)), params)
    params_dir = directory / PARAMS_DIR
    if params_dir.exists() and not overwrite:
        raise FileExistsError(f"{params_dir}: already exists (pass overwrite=True to replace it)")
    directory.mkdir(parents=True, exist_ok=True)
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(params_dir, param_tree.nest(params), force=overwrite)
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
    (directory / CONFIG_FILE).write_text(json.dumps({"model": kind, "config": config_to_dict(config)}, indent=2)
                                         + "\n")
    return directory


def read_config(directory: str | os.PathLike) -> tuple[str, Any]:
    """(kind, config) from `directory/config.json`."""
    path = Path(directory) / CONFIG_FILE
    data = _read_json(path)
    kind = data.get("model")
    if not isinstance(kind, str) or kind not in MODEL_KINDS:
        raise ValueError(f"{path}: unknown model kind {kind!r}; known kinds: {sorted(MODEL_KINDS)}")
    if not isinstance(data.get("config"), Mapping):
        raise ValueError(f"{path}: no 'config' object")
    config_cls, _ = MODEL_KINDS[kind].resolve()
    return kind, config_from_dict(config_cls, data["config"], where=f"{path}: config")


def _restore(directory: Path, kind: str, config: Any, mesh: jax.sharding.Mesh | None, dtype: Any = None
             ) -> dict[str, Any]:
    """Flat params: host numpy arrays without a mesh, else jax arrays sharded by their logical axes on `mesh`
    (each device reads only its shards). The checkpoint's own shardings are never reused: they name the devices of
    the run that wrote it. `dtype`: floating arrays are cast to it while reading (else the stored dtype wins)."""
    import orbax.checkpoint as ocp

    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: no such directory (not a pretrained model directory)")
    model = abstract_model(kind, config)
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(params_dir)
        metadata = getattr(metadata, "item_metadata", metadata)
        saved = param_tree.flatten(dict(getattr(metadata, "tree", metadata)))
        param_tree.check_params(str(params_dir), param_tree.model_params(model), saved)
        dtypes = {p: dtype if dtype is not None and jnp.issubdtype(m.dtype, jnp.floating) else m.dtype
                  for p, m in saved.items()}
        if mesh is None:
            args = {p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtypes[p]) for p in saved}
        else:
            named = sharding.state_shardings(nnx.state(model, nnx.Not(nnx.RngState)), mesh)
            shardings = {param_tree.path_string(path): s for path, s in nnx.to_flat_state(named)}
            args = {p: ocp.ArrayRestoreArgs(sharding=shardings[p], global_shape=tuple(m.shape), dtype=dtypes[p])
                    for p, m in saved.items()}
        restored = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
            restore_args=param_tree.nest(args)))
    return param_tree.flatten(restored)


def load(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, dict[str, Any]]:
    """(config, flat '/'-keyed params) of the model at `path` (see `resolve`). Host numpy arrays, or jax arrays
    sharded by their logical axes on `mesh`."""
    directory = resolve(path)
    kind, config = read_config(directory)
    return config, _restore(directory, kind, config, mesh)


def load_model(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, dtype: Any = None
               ) -> nnx.Module:
    """The model at `path` (see `resolve`), rebuilt abstractly and filled from the checkpoint (jax arrays, on the
    default device or sharded on `mesh`). `dtype` (e.g. jnp.bfloat16): the model computes in it and its floating
    weights are read into it (`config_with_dtype`); None keeps the saved config and dtypes."""
    directory = resolve(path)
    kind, config = read_config(directory)
    if dtype is not None:
        config = config_with_dtype(config, dtype)
    params = _restore(directory, kind, config, mesh, dtype)
    if mesh is None:
        params = {p: jnp.asarray(v) for p, v in params.items()}
    return param_tree.model_from_flat(abstract_model(kind, config), params)
