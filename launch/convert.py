"""Checkpoint conversion between foreign formats and our pretrained format (config.json + params/ + tokenizer/).

    python launch/convert.py qwen2-from-hf  <hf-qwen2-dir> <our-dir>
    python launch/convert.py qwen2-to-hf    <our-dir> <hf-dir>
    python launch/convert.py af2-from-torch <nvidia-af2-release or state-dict file> <our-dir> [--tokenizer DIR]
    python launch/convert.py af2-to-torch   <our-dir> <release-dir> [--with-clap-ckpt]
    python launch/convert.py afclap-from-torch <clap_ckpt/epoch_16.pt or .safetensors> <our-dir> [--tokenizer FILE]
    python launch/convert.py afclap-to-torch   <our-dir> <file.pt or .safetensors>

Every key is accounted for: a missing, unexpected or mis-shaped key stops the conversion with an error that names
each one (exit code 1). The key tables live in af2_jax/convert/ (one per format); this file is only the commands.
"""
from __future__ import annotations

import argparse
import ast
import pathlib
import sys
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import af2_jax  # noqa: E402,F401  (package-wide flax settings)

SHARD_BYTES = 4 << 30  # HF's usual shard size


# -- Qwen2 / Qwen2.5 in Hugging Face's layout ----------------------------------------------------------------------

def qwen2_from_hf(args: argparse.Namespace) -> None:
    from af2_jax import pretrained
    from af2_jax.convert.qwen2_hf import import_hf

    config, params = import_hf(args.src, dtype=args.dtype, progress=args.progress)
    pretrained.save(args.dst, config, params)


def qwen2_to_hf(args: argparse.Namespace) -> None:
    from af2_jax import pretrained
    from af2_jax.convert.qwen2_hf import export_hf
    from af2_jax.models.qwen2 import Qwen2Config

    config, params = pretrained.load(args.src)
    if not isinstance(config, Qwen2Config):
        raise ValueError(f"{args.src}: holds a {type(config).__name__}, not a Qwen2 model")
    export_hf(config, params, args.dst, dtype=args.dtype, max_shard_bytes=args.max_shard_bytes,
              progress=args.progress)


def _qwen2_flags(parser: argparse.ArgumentParser, *, export: bool) -> None:
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of the written weights (default: the source checkpoint's)")
    if export:
        parser.add_argument("--max-shard-bytes", type=int, default=SHARD_BYTES, help="largest safetensors shard")


# -- NVIDIA's AF2 release -------------------------------------------------------------------------------------------

def parse_settings(entries) -> tuple[dict[str, Any], dict[str, Any]]:
    """['llm.num_heads=4', 'max_windows=30'] -> ({'llm.num_heads': 4}, {'max_windows': 30}): sub-config fields
    (with a dot) and AF2Config fields; values are Python literals."""
    overrides, fields = {}, {}
    for entry in entries:
        key, eq, text = entry.partition("=")
        if not eq or not key:
            raise ValueError(f"--set {entry!r}: expected FIELD=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--set {entry!r}: {text!r} is not a number, string or tuple literal") from None
        (overrides if "." in key else fields)[key.strip()] = value
    return overrides, fields


def af2_from_torch(args: argparse.Namespace) -> None:
    from af2_jax import pretrained
    from af2_jax.convert.af2_release import import_release, import_tokenizer

    overrides, fields = parse_settings(args.set)
    config, params, report = import_release(args.src, preset=args.preset, dtype=args.dtype, progress=args.progress,
                                            overrides=overrides, **fields)
    tokenizer = None
    if args.tokenizer:
        tokenizer, config = import_tokenizer(args.tokenizer, config)
    pretrained.save(args.dst, config, params, tokenizer=tokenizer)
    if tokenizer is None:
        print(f"warning: no --tokenizer given; {args.dst} holds no tokenizer (launch/infer.py will need --tokenizer)")
    for key, value in report.items():
        print(f"{key}: {value}")


def af2_to_torch(args: argparse.Namespace) -> None:
    from af2_jax import pretrained
    from af2_jax.convert.af2_release import METADATA_FILE, export_release, write_clap_checkpoint
    from af2_jax.models.af2 import AF2Config

    config, params = pretrained.load(args.src)
    if not isinstance(config, AF2Config):
        raise ValueError(f"{args.src}: holds a {type(config).__name__}, not an AF2 model")
    files = export_release(config, params, args.dst, max_chunk_bytes=args.max_chunk_bytes, progress=args.progress)
    print(f"wrote {len(files)} chunk(s) and safe_ckpt/{METADATA_FILE}")
    if args.with_clap_ckpt:
        count = write_clap_checkpoint(config, params, pathlib.Path(args.dst) / "clap_ckpt" / "epoch_16.pt")
        print(f"wrote clap_ckpt/epoch_16.pt ({count} audio-branch tensors)")


def _af2_from_torch_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="local HF tokenizer directory (tokenizer.json) of the checkpoint's LLM; stored as "
                             "DST/tokenizer with AF2's special tokens added if absent")
    parser.add_argument("--preset", default=None,
                        help="AF2 preset (tiny, 0.5b, 1.5b, 3b); default: every size from the checkpoint's shapes")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field no shape holds: llm.num_heads=16, audio_transformer.n_heads=8, "
                             "max_windows=30 (repeatable); needed only for sizes no preset has")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="dtype of the stored parameters (default float32, as the release)")


def _af2_to_torch_flags(parser: argparse.ArgumentParser) -> None:
    from af2_jax.convert.af2_release import CHUNK_BYTES

    parser.add_argument("--max-chunk-bytes", type=int, default=CHUNK_BYTES, help="largest safetensors chunk (bytes)")
    parser.add_argument("--with-clap-ckpt", action="store_true",
                        help="also write clap_ckpt/epoch_16.pt (the HTSAT weights as module.audio_branch.*), which "
                             "the reference's loader opens before safe_ckpt")


# -- NVIDIA's AF-CLAP checkpoint -----------------------------------------------------------------------------------

def _afclap_overrides(entries) -> dict[str, Any]:
    """--set t5.relative_attention_max_distance=64 / joint_dim=512 -> import_afclap's keywords."""
    overrides, fields = parse_settings(entries)
    for dotted, value in overrides.items():
        part, _, name = dotted.partition(".")
        if part not in ("htsat", "t5") or not name:
            raise ValueError(f"--set {dotted}: expected htsat.FIELD, t5.FIELD or an AFCLAPConfig field")
        fields.setdefault(part, {})[name] = value
    return fields


def afclap_from_torch(args: argparse.Namespace) -> None:
    from af2_jax import pretrained
    from af2_jax.clap_tokenizer import ClapTokenizer
    from af2_jax.convert.afclap_release import import_afclap

    tokenizer = ClapTokenizer.from_file(args.tokenizer) if args.tokenizer else None  # a bad path fails first
    config, params, report = import_afclap(args.src, dtype=args.dtype, progress=args.progress,
                                           **_afclap_overrides(args.set))
    if tokenizer is not None and tokenizer.vocab_size > config.t5.vocab_size:
        raise ValueError(f"{args.tokenizer}: tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's T5 "
                         f"embedding has {config.t5.vocab_size} rows")
    pretrained.save(args.dst, config, params, tokenizer=tokenizer)
    if tokenizer is None:
        print(f"warning: no --tokenizer given; {args.dst} holds no tokenizer (text embeddings will need one)")
    for key, value in report.items():
        print(f"{key}: {value}")


def afclap_to_torch(args: argparse.Namespace) -> None:
    from af2_jax import pretrained
    from af2_jax.convert.afclap_release import export_afclap
    from af2_jax.models.afclap import AFCLAPConfig

    config, params = pretrained.load(args.src)
    if not isinstance(config, AFCLAPConfig):
        raise ValueError(f"{args.src}: holds a {type(config).__name__}, not an AF-CLAP model")
    count = export_afclap(config, params, args.dst)
    where = "" if pathlib.Path(args.dst).suffix == ".safetensors" else " under 'state_dict'"
    print(f"wrote {count} state-dict keys{where} (module.-prefixed, the tied T5 embedding under both names)")


def _afclap_from_torch_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default=None, metavar="FILE",
                        help="the T5 text tokenizer (tokenizer.json, or a directory holding one); stored as "
                             "DST/tokenizer/")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field no shape holds: t5.relative_attention_max_distance=128, "
                             "t5.layer_norm_epsilon=1e-6, context_length=77 (repeatable)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="dtype of the stored parameters (default float32, as the checkpoint)")


# name -> (run, add its flags, help)
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], Callable[[argparse.ArgumentParser], None], str]] = {
    "qwen2-from-hf": (qwen2_from_hf, lambda p: _qwen2_flags(p, export=False),
                      "HF Qwen2/Qwen2.5 directory (config.json + safetensors) -> our pretrained format"),
    "qwen2-to-hf": (qwen2_to_hf, lambda p: _qwen2_flags(p, export=True),
                    "our pretrained Qwen2 directory -> HF directory that transformers loads"),
    "af2-from-torch": (af2_from_torch, _af2_from_torch_flags,
                       "NVIDIA AF2 release (dir with safe_ckpt/ [+ clap_ckpt/]) or state-dict file -> our "
                       "pretrained format (+ tokenizer)"),
    "af2-to-torch": (af2_to_torch, _af2_to_torch_flags,
                     "our pretrained AF2 directory -> NVIDIA release layout (safe_ckpt/metadata.json + chunks, "
                     "every reference key, aliases included)"),
    "afclap-from-torch": (afclap_from_torch, _afclap_from_torch_flags,
                          "NVIDIA AF-CLAP checkpoint (clap_ckpt/epoch_16.pt, or a .safetensors state dict) -> our "
                          "pretrained format (+ T5 tokenizer)"),
    "afclap-to-torch": (afclap_to_torch, lambda p: None,
                        "our pretrained AF-CLAP directory -> a checkpoint NVIDIA's load_afclap_ckpt loads "
                        "(.pt {'state_dict': ...} or .safetensors)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, add_flags, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("src", help="source checkpoint directory (or file)")
        p.add_argument("dst", help="destination directory")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        add_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from af2_jax.param_tree import ConversionError
    from af2_jax.tokenizer import TokenizerError

    try:
        COMMANDS[args.command][0](args)
    except ConversionError as e:  # every offending key, in full
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, NotADirectoryError, TokenizerError, ValueError, KeyError,
            ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
