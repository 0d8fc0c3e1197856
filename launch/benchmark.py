"""Throughput benchmarks. One subcommand per measured component; results go to docs/PERFORMANCE.md.

    python launch/benchmark.py encoder --presets tiny large --windows 12 --iters 1

encoder: windows/second of the audio encoder forward (HTSAT over every window + the audio transformer over all of
them), jitted, eval mode, random weights and random log-mel input. Compile time is measured and reported apart
from the timed iterations (which start after one warm-up call and end with block_until_ready).

    python launch/benchmark.py generate --preset tiny --batches 1 16 --windows 1 30

generate: AF2 batched generation (af2_jax.inference.generate), random weights, no early stop. Reports the prefill
cost (audio encoder + every layer's audio keys/values, then the prompt through the LLM) per window count, and the
decode loop's tokens/second per batch size (from the difference of a 1-token and an N-token run, so the prefill is
not counted twice).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ("float32", "bfloat16")


def _random_module(make, seed: int):
    """A module with random N(0, 0.02) weights (unit running variances), built without running its initialisers:
    random init compiles many small kernels, and speed does not depend on the values."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from af2_jax.convert.mapping import flatten, unflatten

    abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    values = {}
    for path, leaf in flatten(state.to_pure_dict()).items():
        if not np.issubdtype(leaf.dtype, np.floating) and leaf.dtype != jnp.bfloat16:
            values[path] = jnp.zeros(leaf.shape, leaf.dtype)
        elif path.endswith("/var"):
            values[path] = jnp.ones(leaf.shape, leaf.dtype)
        else:
            values[path] = jnp.asarray((rng.standard_normal(leaf.shape, np.float32) * 0.02), leaf.dtype)
    nnx.replace_by_pure_dict(state, unflatten(values))
    return nnx.merge(graphdef, state)


def run_encoder(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from af2_jax.models.audio_encoder import encode_audio
    from af2_jax.models.audio_transformer import AudioTransformer, audio_transformer_preset
    from af2_jax.models.htsat import HTSAT, htsat_preset

    results = []
    for preset in args.presets:
        dtypes = dict(dtype=jnp.dtype(args.dtype))
        htsat_config = htsat_preset(preset, scan_blocks=not args.unroll_blocks, **dtypes)
        at_config = audio_transformer_preset(preset, **dtypes)
        htsat = _random_module(lambda: HTSAT(htsat_config, rngs=nnx.Rngs(0)), 0)
        transformer = _random_module(lambda: AudioTransformer(at_config, rngs=nnx.Rngs(0)), 1)
        graphdefs, states = zip(*(nnx.split(m) for m in (htsat, transformer)))

        @jax.jit
        def forward(states, mel, window_mask):
            h, t = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
            return encode_audio(h, t, mel, window_mask)[0]

        rng = np.random.default_rng(2)
        mel = jnp.asarray(rng.normal(-30.0, 15.0, (args.batch, args.windows, 1001, 64)).astype(np.float32))
        window_mask = jnp.ones((args.batch, args.windows), jnp.float32)

        start = time.perf_counter()
        compiled = forward.lower(states, mel, window_mask).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        temp_gib = round(memory.temp_size_in_bytes / 2**30, 2) if memory is not None else None
        if args.compile_only:
            result = dict(benchmark="encoder-compile", preset=preset, dtype=args.dtype, batch=args.batch,
                          windows=args.windows, scan_blocks=not args.unroll_blocks, compile_s=round(compile_s, 2),
                          temp_gib=temp_gib)
            print(json.dumps(result), flush=True)
            results.append(result)
            continue
        jax.block_until_ready(compiled(states, mel, window_mask))  # warm-up, not timed
        start = time.perf_counter()
        for _ in range(args.iters):
            out = compiled(states, mel, window_mask)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - start
        windows = args.batch * args.windows * args.iters
        result = dict(benchmark="encoder", preset=preset, dtype=args.dtype, batch=args.batch, windows=args.windows,
                      iters=args.iters, scan_blocks=not args.unroll_blocks, compile_s=round(compile_s, 2), temp_gib=temp_gib,
                      seconds_per_iter=round(elapsed / args.iters, 3), windows_per_s=round(windows / elapsed, 3),
                      backend=jax.default_backend(), devices=len(jax.devices()), device=str(jax.devices()[0]),
                      cpu_count=os.cpu_count(), machine=platform.platform())
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def _timed(fn, iters: int) -> tuple[float, float]:
    """(first call incl. compile, best of `iters` later calls) in seconds; fn must block until done."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


def run_generate(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from af2_jax.inference import generate as gen
    from af2_jax.inference.sampling import SamplingConfig
    from af2_jax.models.af2 import AF2Model, af2_preset

    config = af2_preset(args.preset, dtype=jnp.dtype(args.dtype))
    model = _random_module(lambda: AF2Model(config, rngs=nnx.Rngs(0)), 0)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    machine = dict(backend=jax.default_backend(), device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
                   machine=platform.platform())
    ids = jnp.asarray(rng.integers(0, 200, (max(args.batches), args.prompt_tokens)), jnp.int32)
    key = jax.random.key(0)

    def decode(audio_kv, media_mask, batch, steps):
        sampling = SamplingConfig(max_new_tokens=steps)
        tokens = gen._decode(graphdef, state, audio_kv, media_mask, ids[:batch], jnp.ones((batch, args.prompt_tokens),
                             jnp.int32), key, sampling=sampling, eos_id=-1, pad_id=config.pad_token_id)
        return jax.block_until_ready(tokens)

    results = []
    for windows in args.windows:  # prefill cost against audio length, batch 1
        audio = jnp.asarray(rng.uniform(-0.5, 0.5, (1, windows, 160000)), jnp.float32)
        mask = jnp.ones((1, windows), jnp.float32)
        holder = {}

        def encode():
            holder["kv"] = jax.block_until_ready(gen._encode(graphdef, state, audio, mask))

        enc_first, enc_best = _timed(encode, args.iters)
        pre_first, pre_best = _timed(lambda: decode(*holder["kv"], 1, 1), args.iters)
        result = dict(benchmark="generate-prefill", preset=args.preset, dtype=args.dtype, batch=1, windows=windows,
                      audio_tokens=windows * config.htsat.tokens_per_window, prompt_tokens=args.prompt_tokens,
                      encode_compile_s=round(enc_first - enc_best, 2), encode_s=round(enc_best, 4),
                      text_prefill_s=round(pre_best, 4), prefill_total_s=round(enc_best + pre_best, 4), **machine)
        print(json.dumps(result), flush=True)
        results.append(result)
    for batch in args.batches:  # decode throughput against batch size, 1 window each
        audio = jnp.asarray(rng.uniform(-0.5, 0.5, (batch, 1, 160000)), jnp.float32)
        audio_kv, media_mask = gen._encode(graphdef, state, audio, jnp.ones((batch, 1), jnp.float32))
        _, one = _timed(lambda: decode(audio_kv, media_mask, batch, 1), args.iters)
        first, many = _timed(lambda: decode(audio_kv, media_mask, batch, args.new_tokens), args.iters)
        loop_s = max(many - one, 1e-9)
        result = dict(benchmark="generate-decode", preset=args.preset, dtype=args.dtype, batch=batch,
                      new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, compile_s=round(first - many, 2),
                      loop_s=round(loop_s, 4), tokens_per_s=round(batch * (args.new_tokens - 1) / loop_s, 1),
                      ms_per_step=round(1000 * loop_s / (args.new_tokens - 1), 2), **machine)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encoder", help="audio encoder (HTSAT + audio transformer) forward throughput")
    enc.add_argument("--presets", nargs="+", default=["tiny", "large"], choices=["tiny", "large"])
    enc.add_argument("--windows", type=int, default=12, help="10 s windows per example")
    enc.add_argument("--batch", type=int, default=1, help="examples per call")
    enc.add_argument("--iters", type=int, default=3, help="timed iterations after the warm-up")
    enc.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (weights stay float32)")
    enc.add_argument("--unroll-blocks", action="store_true", help="unroll the Swin blocks instead of scanning pairs")
    enc.add_argument("--compile-only", action="store_true", help="report the compile time only")
    enc.set_defaults(func=run_encoder)
    gen = sub.add_parser("generate", help="AF2 generation: prefill cost per window count, decode tokens/s per batch")
    gen.add_argument("--preset", default="tiny", choices=["tiny", "0.5b", "1.5b", "3b"])
    gen.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes for decode throughput")
    gen.add_argument("--windows", type=int, nargs="+", default=[1, 30], help="window counts for the prefill cost")
    gen.add_argument("--prompt-tokens", type=int, default=16)
    gen.add_argument("--new-tokens", type=int, default=32, help="decode steps per timed run (no early stop)")
    gen.add_argument("--iters", type=int, default=2, help="timed repetitions after the first call (best is kept)")
    gen.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (weights stay float32)")
    gen.set_defaults(func=run_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for name in ("windows", "iters", "batch", "batches", "prompt_tokens"):
        value = getattr(args, name, 1)
        if min(value if isinstance(value, list) else [value]) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if getattr(args, "new_tokens", 2) < 2:
        raise SystemExit("--new-tokens must be at least 2")
    args.func(args)


if __name__ == "__main__":
    main()
