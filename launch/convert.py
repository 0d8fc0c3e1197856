"""Checkpoint conversion between foreign formats and our pretrained format.

    python launch/convert.py qwen2-from-hf  <hf-qwen2-dir> <our-dir>
    python launch/convert.py qwen2-to-hf    <our-dir> <hf-dir>
    python launch/convert.py --help         # every registered command (af2_jax/convert/commands.py)
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import af2_jax  # noqa: E402,F401  (package-wide flax settings)
from af2_jax.convert import commands  # noqa: E402
from af2_jax.convert.mapping import ConversionError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in sorted(commands.load_commands().items()):
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("src", help="source checkpoint directory")
        p.add_argument("dst", help="destination directory")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        if command.add_arguments is not None:
            command.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands.CONVERT_COMMANDS[args.command].run(args)
    except ConversionError as e:  # every offending key, in full
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
