"""A training run's config (configs/stageN.py, any overrides applied): checked before anything is created, and
summarised in a short header so that a run says what it is doing (preset, weights it starts from, data).

`validate(cfg)` raises `ConfigError` with one line naming the field; `header(cfg, workdir)` is the few lines the
loop logs at the start instead of the whole config (which stays in `<workdir>/run_config.json`).
"""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A run config field that cannot work; the message names it."""


def load_stage_config(stage: int, preset: str = "tiny"):
    """configs/stageN.py's get_config(preset) (stage 0: configs/clap.py, AF-CLAP's pretraining), loaded by path as
    launch/train.py's --config flag loads it."""
    path = CONFIGS_DIR / ("clap.py" if stage == 0 else f"stage{stage}.py")
    spec = importlib.util.spec_from_file_location(f"af2_configs_stage{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for name in dotted.split("."):
        try:
            node = node[name]
        except (KeyError, TypeError, AttributeError):
            raise ConfigError(f"config: missing field {dotted!r}") from None
    return node


def _at_least(cfg: Any, dotted: str, low: int | float) -> None:
    value = _get(cfg, dotted)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise ConfigError(f"config: {dotted} must be a number >= {low}, got {value!r}")


def _validate_af2(cfg: Any) -> None:
    from af2_jax.models.af2 import AF2_PRESETS

    _at_least(cfg, "max_windows", 1)
    _at_least(cfg, "max_tokens", 2)
    if _get(cfg, "model.preset") not in AF2_PRESETS:
        raise ConfigError(f"config: model.preset must be one of {sorted(AF2_PRESETS)}, got {cfg.model.preset!r}")
    buckets = tuple(_get(cfg, "window_buckets"))
    if any(not isinstance(b, int) or b < 1 for b in buckets):
        raise ConfigError(f"config: window_buckets must be positive window counts, got {buckets}")


def _validate_afclap(cfg: Any) -> None:
    from af2_jax.models.afclap import AFCLAP_PRESETS

    _at_least(cfg, "num_positives", 1)
    _at_least(cfg, "num_negatives", 0)
    if _get(cfg, "model.preset") not in AFCLAP_PRESETS:
        raise ConfigError(f"config: model.preset must be one of {sorted(AFCLAP_PRESETS)}, got {cfg.model.preset!r}")


TASK_CHECKS = {"af2": _validate_af2, "afclap": _validate_afclap}


def validate(cfg: Any) -> None:
    """Every field the loop reads, with its allowed range; the data sources too (af2_jax.data.config)."""
    task = _get(cfg, "task")
    if task not in TASK_CHECKS:
        raise ConfigError(f"config: task must be one of {sorted(TASK_CHECKS)}, got {task!r}")
    TASK_CHECKS[task](cfg)
    for field in ("batch_size", "grad_accum_steps", "num_steps", "log_every",
                  "checkpoint.every_steps", "checkpoint.keep", "checkpoint.preemption_check_every"):
        _at_least(cfg, field, 1)
    _at_least(cfg, "num_workers", 0)
    _at_least(cfg, "optimizer.warmup_steps", 0)
    _at_least(cfg, "optimizer.weight_decay", 0)
    _at_least(cfg, "optimizer.learning_rate", 0)  # 0 is allowed: frozen runs check chaining and exports
    if _get(cfg, "optimizer.schedule") not in SCHEDULES:
        raise ConfigError(f"config: optimizer.schedule must be one of {SCHEDULES}, got {cfg.optimizer.schedule!r}")
    for field in ("model.compute_dtype", "frozen_param_dtype"):
        if _get(cfg, field) not in DTYPE_NAMES:
            raise ConfigError(f"config: {field} must be one of {DTYPE_NAMES}, got {_get(cfg, field)!r}")
    sizes = [_get(cfg, f"mesh.{axis}") for axis in ("data", "fsdp", "tensor")]
    if any(not isinstance(s, int) or (s < 1 and s != -1) for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(f"config: mesh sizes (data, fsdp, tensor) must be >= 1, one of them may be -1 (all "
                          f"remaining devices); got {tuple(sizes)}")
    if not tuple(_get(cfg, "trainable")):
        raise ConfigError("config: trainable is empty (nothing would train)")
    from af2_jax.data import config as data_config

    try:
        data_config.validate(_get(cfg, "data"))
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None


def _describe_sources(data: Any) -> str:
    from af2_jax.data import config as data_config

    parts = []
    for source in data_config.validate(data):
        kind, weight = source["kind"], float(source.get("weight", 1.0))
        if kind.startswith("synthetic"):
            what = f"synthetic {source.get('split', 'train')} ({', '.join(source.get('skills') or ['short skills'])})"
        else:
            what = f"{kind} {source['path']}"
        parts.append(f"{what} x{weight:g}")
    return "; ".join(parts)


def header(cfg: Any, workdir: Any) -> list[str]:
    """What this run is: a few lines for the console (the full config is in the workdir's run_config.json)."""
    stage = cfg.stage
    init = cfg.init_from or "random weights (no init_from)"
    if cfg.task == "afclap":
        what = (f"AF-CLAP contrastive pretraining, preset {cfg.model.preset} -> {workdir}",
                f"{cfg.num_positives} captions and {cfg.num_negatives} composition negatives per clip "
                f"({'composition-aware loss' if cfg.composition_negatives else 'plain loss on the first caption'})")
    else:
        what = (f"AF2 stage {stage}, preset {cfg.model.preset} -> {workdir}",
                f"up to {cfg.max_windows} x 10 s windows, {cfg.max_tokens} tokens")
    lines = [
        what[0],
        f"  steps {cfg.num_steps}, {cfg.batch_size} rows x {cfg.grad_accum_steps} accumulation, {what[1]}, "
        f"lr {cfg.optimizer.learning_rate:g} ({cfg.optimizer.schedule})",
        f"  starts from: {init}",
        f"  trains: {', '.join(cfg.trainable)}",
        f"  data: {_describe_sources(cfg.data)}",
        f"  tokenizer: {cfg.tokenizer or 'the synthetic dataset tiny tokenizer'}",
    ]
    if cfg.task == "af2" and not cfg.init_from and stage in (2, 3):
        lines.append(f"  note: stage {stage} of the curriculum starts from stage {stage - 1}'s workdir "
                     f"(--config.init_from=<stage-{stage - 1} workdir>); this run starts from random weights")
    if cfg.task == "af2" and not cfg.init_from and cfg.model.preset != "tiny":
        lines.append("  note: a real preset from random weights trains nothing useful with a frozen random LLM; "
                     "stage 1 starts from converted Qwen2.5 and AF-CLAP weights (--config.init_from=llm=...,htsat=...)")
    return lines
