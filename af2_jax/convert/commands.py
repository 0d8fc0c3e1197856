"""Registry of `launch/convert.py` subcommands.

A converter module registers its commands when imported, with one line each:

    commands.register_command("af2-from-torch", run, help="...", add_arguments=add_dtype_flag)

`run(args)` receives the argparse namespace (always `src`, `dst` and `progress`); `add_arguments(parser)` may add
flags. The CLI imports every module in `COMMAND_MODULES` that exists, so a converter that is not written yet is
simply absent, while one that fails to import fails loudly.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
from typing import Callable

COMMAND_MODULES: list[str] = [
    "af2_jax.convert.qwen2_hf",  # qwen2-from-hf, qwen2-to-hf
    "af2_jax.convert.af2_torch",  # audio-module rule builders of NVIDIA AF2 PyTorch (no commands yet)
    "af2_jax.convert.af2_release",  # af2-from-torch, af2-to-torch (NVIDIA AF2 release layout)
]


@dataclasses.dataclass(frozen=True)
class ConvertCommand:
    name: str
    run: Callable[[argparse.Namespace], None]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


CONVERT_COMMANDS: dict[str, ConvertCommand] = {}


def register_command(name: str, run: Callable[[argparse.Namespace], None], *, help: str,
                     add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    existing = CONVERT_COMMANDS.get(name)
    if existing is not None and existing.run is not run:
        raise ValueError(f"convert command {name!r} is registered twice")
    CONVERT_COMMANDS[name] = ConvertCommand(name, run, help, add_arguments)


def load_commands() -> dict[str, ConvertCommand]:
    """Imports the converter modules that exist (each registers its commands) and returns the registry."""
    for module in COMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    return CONVERT_COMMANDS
