"""Throughput benchmarks. One subcommand per measured component; results go to docs/PERFORMANCE.md.

    python launch/benchmark.py encoder --presets tiny large --windows 12 --iters 1

encoder: windows/second of the audio encoder forward (HTSAT over every window + the audio transformer over all of
them), jitted, eval mode, random weights and random log-mel input. Compile time is measured and reported apart
from the timed iterations (which start after one warm-up call and end with block_until_ready).

    python launch/benchmark.py generate --preset tiny --batches 1 16 --windows 1 30

generate: AF2 batched generation (af2_jax.inference.generate), random weights, no early stop. Reports the prefill
cost (audio encoder + every layer's audio keys/values, then the prompt through the LLM) per window count, and the
decode loop's tokens/second per batch size (from the difference of a 1-token and an N-token run, so the prefill is
not counted twice). `--weights-dtype bfloat16` and `--quantize int8` hold the weights as a served model does (on a
GPU: batch-1 decode against the weight-read bound).

    python launch/benchmark.py attention --preset 3b --batch 8 --tokens 512 --dtype bfloat16

attention: the LLM's self-attention alone (`jax.nn.dot_product_attention`, forward + backward), XLA against cuDNN's
fused kernel, with the model's own boolean (B, 1, T, S) causal-and-padding mask and with `is_causal=True` alone;
reports time per call and the largest difference, over real (unpadded) query rows, from XLA's masked output.
cuDNN needs a GPU and bf16/fp16.

    python launch/benchmark.py serving --fixture ../shared/fixtures/af2_tiny
    python launch/benchmark.py serving --checkpoint runs/tiny/stage3

serving: quality and size of the serving weights (af2_jax/inference/serving.py) against fp32: bf16, int8 weight-only
and both. With --fixture, the logits on the golden fixture's inputs against the reference's own fp32 logits; for
any model, greedy generation on random audio and prompts (share of rows and of tokens equal to fp32's), the bytes
of the weights and the decode time per token on this machine.

    python launch/benchmark.py compare --reference /tmp/af2_ref --reference-deps /tmp/refdeps --windows 1 30 --iters 2

compare: ours against NVIDIA's own PyTorch AF2 (a checkout of github.com/NVIDIA/audio-flamingo, branch
audio_flamingo_2, imported from DIR at run time and built by launch/reference_af2.py, which says what it patches:
no GPU, no network, no real checkpoint; transformers 5.x instead of the pinned 4.46.3) on the same float32 weights:
ours from --checkpoint MODEL_DIR or, by default, the af2_tiny golden fixture's reference state dict; the
reference's loaded strictly from our af2-to-torch export of them. First a check (max |logit difference| on the
fixture's own inputs and on every timed input; over 1e-3 the command fails), then best-of --iters times, compile
and warm-up excluded: the full forward (audio windows -> logits) per window count; the LLM with its
cross-attention alone given the encoded audio (ours `text_logits(media=...)`, the reference's LM after
`_encode_audio_x` / `_condition_media_locations`, as Flamingo.forward conditions it); greedy generation, 1 window a
row, no early stop (ours batched `generate_tokens`; the reference's `Flamingo.generate` once per row, as its
inference.py loops over samples): items/s and ms per decode step of the batch (from a 1-token and an N-token run),
plus the share of equal tokens. torch gets as many threads as XLA's CPU pool (the usable cores). ratio =
ours / reference.
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

    from af2_jax import param_tree

    abstract = param_tree.abstract_model(make)
    rng = np.random.default_rng(seed)
    values = {}
    for path, leaf in param_tree.model_params(abstract).items():
        if not np.issubdtype(leaf.dtype, np.floating) and leaf.dtype != jnp.bfloat16:
            values[path] = jnp.zeros(leaf.shape, leaf.dtype)
        elif path.endswith("/var"):
            values[path] = jnp.ones(leaf.shape, leaf.dtype)
        else:
            values[path] = jnp.asarray((rng.standard_normal(leaf.shape, np.float32) * 0.02), leaf.dtype)
    return param_tree.model_from_flat(abstract, values)


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
        depths = dict(depths=tuple(args.htsat_depths)) if args.htsat_depths else {}
        htsat_config = htsat_preset(preset, scan_blocks=not args.unroll_blocks,
                                    attention_chunk_scores=args.attention_chunk_scores, **depths, **dtypes)
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
                      iters=args.iters, scan_blocks=not args.unroll_blocks, htsat_depths=htsat_config.depths,
                      attention_chunk_scores=args.attention_chunk_scores, compile_s=round(compile_s, 2),
                      temp_gib=temp_gib,
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

    config = af2_preset(args.preset, dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.weights_dtype))
    model = _random_module(lambda: AF2Model(config, rngs=nnx.Rngs(0)), 0)
    if args.quantize == "int8":
        from af2_jax.inference.serving import quantize_weights

        quantize_weights(model)
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
        result = dict(benchmark="generate-decode", preset=args.preset, dtype=args.dtype,
                      weights=f"{args.weights_dtype}{'+int8' if args.quantize == 'int8' else ''}", batch=batch,
                      new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, compile_s=round(first - many, 2),
                      loop_s=round(loop_s, 4), tokens_per_s=round(batch * (args.new_tokens - 1) / loop_s, 1),
                      ms_per_step=round(1000 * loop_s / (args.new_tokens - 1), 2), **machine)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def _train_setup(preset: str, stage: int, windows: int, *, remat: str, dtype: str, frozen_dtype: str,
                 attention: str | None = None):
    """(model config, model factory, trainable patterns, optimizer, schedule, frozen dtype, run config) from
    configs/stageN.py:PRESET, what launch/train.py runs, with the benchmark's flags laid over it."""
    import dataclasses

    import jax.numpy as jnp

    from af2_jax.training import initialization, optimizer
    from af2_jax.training.run_config import load_stage_config

    cfg = load_stage_config(stage, preset)
    cfg.model.compute_dtype, cfg.model.remat_policy, cfg.frozen_param_dtype = dtype, remat, frozen_dtype
    cfg.max_windows = windows
    config = initialization.model_config(cfg.model, max_windows=windows)
    config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, attention_implementation=attention))
    patterns = tuple(cfg.trainable)
    return (config, initialization.model_factory(config, cfg.seed), patterns,
            optimizer.make_optimizer(cfg.optimizer, patterns, cfg.num_steps),
            optimizer.learning_rate_schedule(cfg.optimizer, cfg.num_steps), jnp.dtype(frozen_dtype), cfg)


def _train_htsat(cfg) -> bool:
    """HTSAT in training mode when the stage trains it and its config says so (as the train loop decides)."""
    return cfg.htsat_train_mode and any(p.startswith("htsat") for p in cfg.trainable)


def train_flops(config, trainable: tuple[str, ...], batch: int, windows: int, tokens: int) -> dict:
    """Model FLOPs of one train step (no remat recomputation), per component: 2 x (multiply-adds) forward per
    weight use, x3 for trainable weights (forward, activation grad, weight grad), x2 for frozen weights with a
    trainable part before them (forward, activation grad), x1 for frozen weights with nothing trainable before them;
    attention scores (QK^T and PV, no weights) x3 where activation grads flow, else x1."""
    from af2_jax.training import stages

    h, at, llm, xa = config.htsat, config.audio_transformer, config.llm, config.xattn
    trains = stages.PathMatcher(trainable)
    htsat_trains = trains("htsat/x")
    grid = h.spec_size // h.patch_stride  # 64 x 64 patches per window
    audio = windows * h.tokens_per_window  # audio tokens per example (64 per window)
    rows = {}

    def add(name, fwd_flops, factor):
        rows[name] = rows.get(name, 0.0) + fwd_flops * factor * batch

    # factors: HTSAT trains (x3) or is frozen with nothing before it (x1); the audio transformer and xattn train in
    # every stage; the frozen LLM layers lie between trainable xattn blocks and the (tied, trainable) output
    # embedding, so they need activation grads (x2); an untied frozen lm_head after trainable parts also x2.
    hf = 3 if htsat_trains else 1
    for s, depth in enumerate(h.depths):
        dim, n = h.embed_dim << s, windows * (grid >> s) ** 2
        win = h.stage_window(s)
        mlp = int(dim * h.mlp_ratio)
        add("htsat blocks (matmuls)", depth * 2 * n * (dim * 3 * dim + dim * dim + 2 * dim * mlp), hf)
        add("htsat window attention scores", depth * 2 * 2 * n * win * win * dim, hf)
        if s < len(h.depths) - 1:
            add("htsat patch merging", 2 * (n // 4) * (4 * dim) * (2 * dim), hf)
    add("htsat patch embed (conv)", 2 * windows * grid * grid * h.patch_size ** 2 * h.in_chans * h.embed_dim, hf)
    d = at.d_model
    add("audio transformer (matmuls)", at.n_layers * 2 * audio * (4 * d * d + 2 * d * at.d_inner), 3)
    add("audio transformer attention scores", at.n_layers * 2 * 2 * audio * audio * d, 3)
    inner = xa.heads * xa.dim_head
    layers, dm = llm.num_layers, llm.hidden_size
    ff = xa.dim * xa.ff_mult
    add("xattn q/out/ff (text tokens)", layers * 2 * tokens * (2 * dm * inner + 2 * dm * ff), 3)
    add("xattn audio k/v (audio tokens)", layers * 2 * audio * xa.dim_audio * 2 * inner, 3)
    add("xattn attention scores", layers * 2 * 2 * tokens * audio * inner, 3)
    head_dim = dm // llm.num_heads
    kv = llm.num_kv_heads * head_dim
    add("llm layers (matmuls)", layers * 2 * tokens * (2 * dm * dm + 2 * dm * kv + 3 * dm * llm.intermediate_size), 2)
    add("llm causal attention scores", layers * 2 * 2 * (tokens * (tokens + 1) / 2) * dm, 3)
    head_trains = llm.tie_word_embeddings and trains("llm/embed_tokens/embedding")
    add("lm head (tied embedding)" if llm.tie_word_embeddings else "lm head", 2 * tokens * dm * llm.vocab_size,
        3 if head_trains else 2)
    rows["total"] = sum(rows.values())
    return rows


def _abstract_batch(batch: int, windows: int, tokens: int, mesh, accumulation: int = 1):
    import jax
    import jax.numpy as jnp

    from af2_jax.training import distributed
    sharding = distributed.batch_sharding(mesh)
    shapes = {"audio": ((accumulation, batch, windows, 160000), jnp.float32),
              "audio_mask": ((accumulation, batch, windows), jnp.float32),
              "input_ids": ((accumulation, batch, tokens), jnp.int32),
              "attention_mask": ((accumulation, batch, tokens), jnp.int32),
              "loss_mask": ((accumulation, batch, tokens), jnp.float32)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def run_train(args: argparse.Namespace) -> list[dict]:
    import jax
    import numpy as np

    from af2_jax import sharding
    from af2_jax.training import step as step_lib, train_state

    mesh = sharding.make_mesh(args.data, args.fsdp, args.tensor)
    results = []
    for stage in args.stages:
        config, make_model, patterns, tx, schedule, frozen_dtype, cfg = _train_setup(
            args.preset, stage, args.windows, remat=args.remat, dtype=args.dtype, frozen_dtype=args.frozen_dtype,
            attention=args.attention)
        flops = train_flops(config, patterns, args.batch, args.windows, args.tokens)
        common = dict(preset=args.preset, stage=stage, batch=args.batch, windows=args.windows, tokens=args.tokens,
                      dtype=args.dtype, frozen_dtype=args.frozen_dtype, remat=args.remat,
                      attention=args.attention or "default", mesh=dict(mesh.shape),
                      model_flops_per_step=flops["total"])
        if args.aot:
            split, abstract_state, abstract_frozen = train_state.abstract_train_state(make_model, patterns, tx,
                                                                                      frozen_dtype)
            shardings = (train_state.tree_shardings(abstract_state, mesh),
                         train_state.tree_shardings(abstract_frozen, mesh))
            state, frozen = abstract_state, abstract_frozen  # jit's in_shardings place them
            step = step_lib.jit_train_step(
                step_lib.make_train_step(split, tx, schedule, loss=step_lib.af2_loss(train_htsat=_train_htsat(cfg))), mesh, shardings)
            start = time.perf_counter()
            with jax.set_mesh(mesh):
                compiled = step.lower(state, frozen, _abstract_batch(args.batch, args.windows, args.tokens,
                                                                     mesh)).compile()
            compile_s = time.perf_counter() - start
            memory = compiled.memory_analysis()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            gib = lambda b: round(b / 2**30, 3)  # noqa: E731
            mem = dict(argument_gib=gib(memory.argument_size_in_bytes), output_gib=gib(memory.output_size_in_bytes),
                       alias_gib=gib(memory.alias_size_in_bytes), temp_gib=gib(memory.temp_size_in_bytes),
                       total_gib=gib(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                     - memory.alias_size_in_bytes + memory.temp_size_in_bytes))
            result = dict(benchmark="train-aot", **common, compile_s=round(compile_s, 1),
                          per_device_memory=mem, xla_cost_flops_per_device=(cost or {}).get("flops"),
                          model_flops=flops)
        else:
            split, state, frozen, shardings = train_state.create_train_state(make_model, patterns, tx, mesh,
                                                                             frozen_dtype)
            step = step_lib.jit_train_step(
                step_lib.make_train_step(split, tx, schedule, loss=step_lib.af2_loss(train_htsat=_train_htsat(cfg))), mesh, shardings)
            rng = np.random.default_rng(0)
            vocab = config.llm.vocab_size
            host = {"audio": (0.3 * rng.normal(size=(1, args.batch, args.windows, 160000))).astype(np.float32),
                    "audio_mask": np.ones((1, args.batch, args.windows), np.float32),
                    "input_ids": rng.integers(0, vocab, (1, args.batch, args.tokens)).astype(np.int32),
                    "attention_mask": np.ones((1, args.batch, args.tokens), np.int32),
                    "loss_mask": np.ones((1, args.batch, args.tokens), np.float32)}
            batch = {k: jax.device_put(v, step_lib.distributed.batch_sharding(mesh)) for k, v in host.items()}
            with jax.set_mesh(mesh):
                start = time.perf_counter()
                state, metrics = step(state, frozen, batch)  # compile + warm-up, not timed
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - start
                start = time.perf_counter()
                for _ in range(args.iters):
                    state, metrics = step(state, frozen, batch)
                jax.block_until_ready((state, metrics))
                elapsed = time.perf_counter() - start
            step_s = elapsed / args.iters
            result = dict(benchmark="train", **common, iters=args.iters, first_call_s=round(compile_s, 1),
                          step_s=round(step_s, 4), model_tflops_per_s=round(flops["total"] / step_s / 1e12, 2),
                          peak_device_gib=_peak_device_gib(),
                          text_tokens_per_s=round(args.batch * args.tokens / step_s, 1),
                          audio_windows_per_s=round(args.batch * args.windows / step_s, 2),
                          backend=jax.default_backend(), devices=len(jax.devices()), cpu_count=os.cpu_count(),
                          machine=platform.platform())
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def run_attention(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from af2_jax.models.af2 import af2_preset

    llm = af2_preset(args.preset).llm
    dtype = jnp.dtype(args.dtype)
    b, t = args.batch, args.tokens
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, llm.head_dim)), dtype)
               for heads in (llm.num_heads, llm.num_kv_heads, llm.num_kv_heads))
    lengths = np.linspace(t // 2, t, b).astype(np.int32)  # right padding, as training batches are
    valid = jnp.asarray(np.arange(t)[None, :] < lengths[:, None])
    mask = (jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :])[:, None]  # the model's (B, 1, T, S)
    machine = dict(backend=jax.default_backend(), device=str(jax.devices()[0]), machine=platform.platform())

    def attend(implementation, use_mask):
        def loss(q, k, v):
            extra = dict(mask=mask) if use_mask else dict(is_causal=True)
            out = jax.nn.dot_product_attention(q, k, v, scale=llm.head_dim ** -0.5, implementation=implementation,
                                               **extra)
            return jnp.sum(jnp.where(valid[:, :, None, None], out, 0).astype(jnp.float32) ** 2), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    results, reference = [], None
    for use_mask in (True, False):
        for implementation in ("xla", "cudnn"):
            name = dict(preset=args.preset, implementation=implementation, dtype=args.dtype, batch=b, tokens=t,
                        heads=llm.num_heads, kv_heads=llm.num_kv_heads, head_dim=llm.head_dim,
                        mask="boolean (B,1,T,S)" if use_mask else "is_causal")
            fn = attend(implementation, use_mask)
            try:
                first, best = _timed(lambda: jax.block_until_ready(fn(q, k, v)), args.iters)
            except Exception as error:  # noqa: BLE001 - cuDNN refuses shapes, dtypes or backends: report why
                result = dict(benchmark="attention", **name, error=f"{type(error).__name__}: {str(error)[:300]}")
            else:
                (_, out), _ = fn(q, k, v)
                out = jnp.where(valid[:, :, None, None], out, 0).astype(jnp.float32)
                reference = out if reference is None else reference  # the first: XLA with the model's mask
                flops = 4 * b * llm.num_heads * llm.head_dim * t * (t + 1) / 2 * 3  # causal QK^T + PV, fwd + bwd
                result = dict(benchmark="attention", **name, compile_s=round(first - best, 2),
                              ms_per_call=round(1000 * best, 3), tflops_per_s=round(flops / best / 1e12, 1),
                              max_abs_diff_vs_xla=float(jnp.max(jnp.abs(out - reference))))
            result.update(machine)
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


SERVING_MODES = (("float32", "none"), ("bfloat16", "none"), ("float32", "int8"), ("bfloat16", "int8"))


def _weight_bytes(model) -> int:
    import jax
    from flax import nnx

    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def run_serving(args: argparse.Namespace) -> list[dict]:
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    from af2_jax import pretrained
    from af2_jax.inference import serving
    from af2_jax.inference.generate import generate_tokens, left_pad
    from af2_jax.inference.sampling import SamplingConfig

    model_dir, golden = args.checkpoint, None
    if args.fixture:
        from af2_jax.convert.af2_release import import_release

        config, params, _ = import_release(os.path.join(args.fixture, "state_dict.safetensors"), progress=False)
        model_dir = pretrained.save(os.path.join(tempfile.mkdtemp(prefix="serving-"), "fixture"), config, params)
        inputs = np.load(os.path.join(args.fixture, "inputs.npz"))
        golden = (inputs, np.load(os.path.join(args.fixture, "outputs.npz"))["logits"])
    _, config = pretrained.read_config(model_dir)
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.5, 0.5, (args.prompts, 1, 160000)).astype(np.float32)
    prompts = [[config.audio_token_id, *rng.integers(0, min(config.llm.vocab_size, 200), size=n),
                config.sep_token_id] for n in rng.integers(2, 12, size=args.prompts)]
    ids, mask = left_pad(prompts, config.pad_token_id)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    machine = dict(backend=jax.default_backend(), device=str(jax.devices()[0]), machine=platform.platform())
    results, reference = [], None
    for dtype, quantize in SERVING_MODES:
        model = serving.load_serving_model(model_dir, serving.ServingOptions(dtype=dtype, quantize=quantize))
        result = dict(benchmark="serving", model=args.fixture or args.checkpoint, dtype=dtype, quantize=quantize,
                      weight_mib=round(_weight_bytes(model) / 2**20, 3))
        if golden is not None:
            x, want = golden
            got = np.asarray(model(*(jnp.asarray(x[k]) for k in ("audio_x", "audio_x_mask", "input_ids",
                                                                   "attention_mask"))))
            real = x["attention_mask"].astype(bool)
            result.update(fixture_logits_max_abs_err=float(np.abs(got - want)[real].max()),
                          fixture_logits_rel_err=float(np.abs(got - want)[real].max() / np.abs(want[real]).max()),
                          fixture_argmax_agree=float((got.argmax(-1) == want.argmax(-1))[real].mean()))
        tokens = generate_tokens(model, audio, np.ones((args.prompts, 1), np.float32), ids, mask, sampling,
                                 eos_id=-1)
        start = time.perf_counter()
        generate_tokens(model, audio, np.ones((args.prompts, 1), np.float32), ids, mask, sampling, eos_id=-1)
        result["generate_s_per_token"] = round((time.perf_counter() - start) / args.new_tokens, 5)
        if reference is None:
            reference = tokens
        same_prefix = np.cumprod(tokens == reference, axis=1).sum(axis=1)
        result.update(rows_equal_to_fp32=float((same_prefix == args.new_tokens).mean()),
                      tokens_before_first_difference=float(same_prefix.mean()), **machine)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def _fixture_default() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.environ.get("AF2_JAX_FIXTURES", os.path.join(os.path.dirname(repo), "shared",
                                                                          "fixtures")), "af2_tiny")


def _compare_models(args: argparse.Namespace):
    """(config, our AF2Model, the reference Flamingo) with the same float32 weights: ours from the model directory
    (or the fixture's reference state dict), the reference's from our af2-to-torch export of them."""
    import importlib.util
    import tempfile

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from safetensors.torch import load_file

    from af2_jax import pretrained
    from af2_jax.convert.af2_release import export_release, import_release
    from af2_jax.models.af2 import AF2Model
    from af2_jax.param_tree import unflatten

    if args.checkpoint:
        config, params = pretrained.load(args.checkpoint)
        config = pretrained.config_with_dtype(config, jnp.float32)
    else:
        config, params, _ = import_release(os.path.join(args.fixture, "state_dict.safetensors"), progress=False)
    params = {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
              or np.asarray(v).dtype.name == "bfloat16" else np.asarray(v) for k, v in params.items()}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AF2Model(config, rngs=nnx.Rngs(0))))
    state.replace_by_pure_dict(unflatten({k: jnp.asarray(v) for k, v in params.items()}))
    ours = nnx.merge(graphdef, state)

    spec = importlib.util.spec_from_file_location(
        "reference_af2", os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_af2.py"))
    reference_af2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference_af2)
    reference, _ = reference_af2.build(args.reference, config, deps=args.reference_deps)
    with tempfile.TemporaryDirectory(prefix="compare-export-") as release:  # what `convert.py af2-to-torch` writes
        state_dict = {}
        for chunk in export_release(config, params, release, progress=False):
            state_dict.update(load_file(str(chunk)))
    reference_af2.load_weights(reference, state_dict.items())
    return config, ours, reference


def _timed_pair(ours, reference, iters: int) -> tuple[float, float, float]:
    """(ours' first call incl. compile, ours' best, the reference's best) of `iters` calls each after one warm-up
    call each, the two sides alternating, so that load from other processes falls on both alike."""
    start = time.perf_counter()
    ours()
    first = time.perf_counter() - start
    reference()
    best = [float("inf"), float("inf")]
    for _ in range(iters):
        for i, fn in enumerate((ours, reference)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return first, best[0], best[1]


def run_compare(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from af2_jax.inference.generate import generate_tokens
    from af2_jax.inference.sampling import SamplingConfig

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls on both sides
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)  # XLA's CPU thread pool has one thread per usable core: the same count
    config, ours, reference = _compare_models(args)
    graphdef, state = nnx.split(ours)
    machine = dict(model=args.checkpoint or args.fixture, backend=jax.default_backend(),
                   device=str(jax.devices()[0]), torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   cpu_count=os.cpu_count(), machine=platform.platform())

    @jax.jit
    def forward(state, audio, audio_mask, ids, mask):
        return nnx.merge(graphdef, state)(audio, audio_mask, ids, mask)

    @jax.jit
    def encode(state, audio, audio_mask):
        return nnx.merge(graphdef, state).encode_audio(audio, audio_mask)

    @jax.jit
    def text(state, media, media_mask, ids, mask):
        return nnx.merge(graphdef, state).text_logits(media_mask, ids, mask, media=media)[0]

    rng = np.random.default_rng(0)
    regular = min(config.eos_token_id, config.audio_token_id)

    def inputs(batch, windows, tokens):
        """Audio of exact 16-bit levels k/32767 (the reference's int16 round trip is then the identity, as for
        audio read from a file), prompts `<audio> w.. <SEP>`, no padding."""
        audio = (rng.integers(-16384, 16384, (batch, windows, 160000)) / 32767.0).astype(np.float32)
        ids = rng.integers(0, regular, (batch, tokens))
        ids[:, 0], ids[:, -1] = config.audio_token_id, config.sep_token_id
        return audio, np.ones((batch, windows), np.float32), ids.astype(np.int64), np.ones((batch, tokens), np.int64)

    def torch_args(*arrays):
        return [torch.from_numpy(a) for a in arrays]

    def emit(result):
        result.update(machine)
        print(json.dumps(result), flush=True)
        results.append(result)

    results, failures = [], []
    if not args.checkpoint:  # the golden fixture's own inputs (padded windows and text): three-way check
        x = np.load(os.path.join(args.fixture, "inputs.npz"))
        golden = np.load(os.path.join(args.fixture, "outputs.npz"))["logits"]
        arrays = [x[k] for k in ("audio_x", "audio_x_mask", "input_ids", "attention_mask")]
        with torch.no_grad():
            theirs = reference(*torch_args(*arrays), use_cache=False).logits.numpy()
        mine = np.asarray(forward(state, *(jnp.asarray(a) for a in arrays)))
        real = x["attention_mask"].astype(bool)
        diffs = dict(ours_vs_reference=float(np.abs(mine - theirs)[real].max()),
                     ours_vs_fixture=float(np.abs(mine - golden)[real].max()),
                     reference_vs_fixture=float(np.abs(theirs - golden)[real].max()))
        emit(dict(benchmark="compare-check", inputs="fixture", **diffs))
        if diffs["ours_vs_reference"] > 1e-3:
            failures.append("fixture inputs")
    for windows in args.windows:
        audio, audio_mask, ids, mask = inputs(args.batch, windows, args.prompt_tokens)
        t_audio, t_audio_mask, t_ids, t_mask = torch_args(audio, audio_mask, ids, mask)
        j_audio, j_audio_mask, j_ids, j_mask = (jnp.asarray(a) for a in (audio, audio_mask, ids.astype(np.int32),
                                                                           mask.astype(np.int32)))
        holder = {}

        def ours_forward():
            holder["ours"] = jax.block_until_ready(forward(state, j_audio, j_audio_mask, j_ids, j_mask))

        def reference_forward():
            with torch.no_grad():
                holder["reference"] = reference(t_audio, t_audio_mask, t_ids, t_mask, use_cache=False).logits

        ours_first, ours_best, reference_best = _timed_pair(ours_forward, reference_forward, args.iters)
        diff = float(np.abs(np.asarray(holder["ours"]) - holder["reference"].numpy()).max())
        common = dict(batch=args.batch, windows=windows, audio_tokens=windows * config.htsat.tokens_per_window,
                      prompt_tokens=args.prompt_tokens, max_abs_logit_diff=diff)
        emit(dict(benchmark="compare-forward", **common, ours_compile_s=round(ours_first - ours_best, 2),
                  ours_s=round(ours_best, 4), reference_s=round(reference_best, 4),
                  ratio=round(ours_best / reference_best, 3)))
        if diff > 1e-3:
            failures.append(f"forward, {windows} windows")

        # the LLM with its cross-attention alone, given the encoded audio (not timed)
        media, media_mask = jax.block_until_ready(encode(state, j_audio, j_audio_mask))
        with torch.no_grad():  # what Flamingo.forward does before the LM: condition every layer on the audio
            reference._encode_audio_x(audio_x=t_audio, audio_x_mask=t_audio_mask)
            reference._condition_media_locations(input_ids=t_ids)

        def ours_text():
            holder["ours"] = jax.block_until_ready(text(state, media, media_mask, j_ids, j_mask))

        def reference_text():
            with torch.no_grad():
                holder["reference"] = reference.lang_encoder(input_ids=t_ids, attention_mask=t_mask,
                                                             use_cache=False).logits

        ours_first, ours_best, reference_best = _timed_pair(ours_text, reference_text, args.iters)
        reference.lang_encoder.clear_conditioned_layers()
        diff = float(np.abs(np.asarray(holder["ours"]) - holder["reference"].numpy()).max())
        common["max_abs_logit_diff"] = diff
        emit(dict(benchmark="compare-llm-xattn", **common, ours_compile_s=round(ours_first - ours_best, 2),
                  ours_s=round(ours_best, 4), reference_s=round(reference_best, 4),
                  ratio=round(ours_best / reference_best, 3)))
        if diff > 1e-3:
            failures.append(f"LLM + cross-attention, {windows} windows")

    # greedy generation, 1 window per row, no early stop on either side: ours batched, the reference's
    # Flamingo.generate once per row (as its inference.py loops over samples)
    reference.lang_encoder.generation_config.eos_token_id = None
    for batch in args.gen_batches:
        audio, audio_mask, ids, mask = inputs(batch, 1, args.prompt_tokens)
        t_audio, t_audio_mask, t_ids, t_mask = torch_args(audio, audio_mask, ids, mask)
        times, tokens = {}, {}
        for steps in (1, args.new_tokens):
            def ours_generate():
                tokens["ours"] = generate_tokens(ours, audio, audio_mask, ids.astype(np.int32), mask.astype(np.int32),
                                                 SamplingConfig(max_new_tokens=steps), eos_id=-1)

            def reference_generate():
                rows = []
                with torch.no_grad():
                    for i in range(batch):
                        out = reference.generate(t_audio[i:i + 1], t_audio_mask[i:i + 1], t_ids[i:i + 1],
                                                 t_mask[i:i + 1], max_new_tokens=steps, do_sample=False, num_beams=1,
                                                 eos_token_id=None, pad_token_id=config.pad_token_id)
                        rows.append(out[0, ids.shape[1]:].numpy())
                tokens["reference"] = np.stack(rows)

            first, times[("ours", steps)], times[("reference", steps)] = _timed_pair(ours_generate,
                                                                                     reference_generate, args.iters)
        same = tokens["ours"] == tokens["reference"][:, :args.new_tokens]
        result = dict(benchmark="compare-generate", batch=batch, new_tokens=args.new_tokens,
                      prompt_tokens=args.prompt_tokens, windows=1,
                      tokens_equal=float(same.mean()), ours_compile_s=round(first - times[("ours", args.new_tokens)], 2))
        for side in ("ours", "reference"):
            total, one = times[(side, args.new_tokens)], times[(side, 1)]
            result[f"{side}_s"] = round(total, 4)
            result[f"{side}_items_per_s"] = round(batch / total, 3)
            result[f"{side}_ms_per_token"] = round(1000 * max(total - one, 0.0) / (args.new_tokens - 1), 3)
        result["ratio"] = round(result["ours_s"] / result["reference_s"], 3)
        result["ratio_ms_per_token"] = (round(result["ours_ms_per_token"] / result["reference_ms_per_token"], 3)
                                        if result["reference_ms_per_token"] > 0 else None)
        emit(result)
    if failures:
        raise SystemExit(f"compare: ours and the reference disagree by more than 1e-3 on: {', '.join(failures)}")
    return results


def _peak_device_gib() -> float | None:
    """Peak bytes the first device's allocator has held (GPU/TPU); None where the backend does not say."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return round(peak / 2**30, 2) if peak else None


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
    enc.add_argument("--htsat-depths", type=int, nargs="+", default=None, help="Swin depths (default: the preset's)")
    enc.add_argument("--attention-chunk-scores", type=int, default=None,
                     help="HTSAT window-attention scores per loop step (default: 2**18 on CPU, 0 elsewhere)")
    enc.set_defaults(func=run_encoder)
    tr = sub.add_parser("train", help="curriculum train step: time and tokens/s, or AOT memory and FLOPs")
    tr.add_argument("--preset", default="tiny", choices=["tiny", "0.5b", "1.5b", "3b"])
    tr.add_argument("--stages", nargs="+", type=int, default=[1, 2], choices=[1, 2, 3])
    tr.add_argument("--windows", type=int, default=1, help="10 s windows per example")
    tr.add_argument("--tokens", type=int, default=64, help="text tokens per example")
    tr.add_argument("--batch", type=int, default=8, help="global rows per step")
    tr.add_argument("--iters", type=int, default=3, help="timed steps after the warm-up")
    tr.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    tr.add_argument("--frozen-dtype", default="float32", choices=DTYPES, help="storage dtype of frozen weights")
    tr.add_argument("--remat", default="none", help="remat policy of the superblock scan (configs: 'full')")
    tr.add_argument("--attention", default=None, choices=["xla", "cudnn"],
                    help="the LLM self-attention's implementation (default: XLA chooses)")
    tr.add_argument("--data", type=int, default=1)
    tr.add_argument("--fsdp", type=int, default=-1)
    tr.add_argument("--tensor", type=int, default=1)
    tr.add_argument("--aot", action="store_true", help="compile from abstract arrays; memory and FLOPs only")
    tr.set_defaults(func=run_train)
    gen = sub.add_parser("generate", help="AF2 generation: prefill cost per window count, decode tokens/s per batch")
    gen.add_argument("--preset", default="tiny", choices=["tiny", "0.5b", "1.5b", "3b"])
    gen.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes for decode throughput")
    gen.add_argument("--windows", type=int, nargs="+", default=[1, 30], help="window counts for the prefill cost")
    gen.add_argument("--prompt-tokens", type=int, default=16)
    gen.add_argument("--new-tokens", type=int, default=32, help="decode steps per timed run (no early stop)")
    gen.add_argument("--iters", type=int, default=2, help="timed repetitions after the first call (best is kept)")
    gen.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    gen.add_argument("--weights-dtype", default="float32", choices=DTYPES,
                     help="dtype the weights are held in (serving: bfloat16 halves what each decode step reads)")
    gen.add_argument("--quantize", default="none", choices=("none", "int8"),
                     help="int8: the decoder's matrices int8 weight-only (af2_jax/inference/serving.py)")
    gen.set_defaults(func=run_generate)
    att = sub.add_parser("attention", help="LLM self-attention, forward + backward: XLA against cuDNN")
    att.add_argument("--preset", default="3b", choices=["tiny", "0.5b", "1.5b", "3b"])
    att.add_argument("--batch", type=int, default=8)
    att.add_argument("--tokens", type=int, default=512)
    att.add_argument("--iters", type=int, default=10, help="timed calls after the first (best is kept)")
    att.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    att.set_defaults(func=run_attention)
    srv = sub.add_parser("serving", help="serving weights (bf16, int8) against fp32: quality, size, decode time")
    source = srv.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a model directory or training workdir")
    source.add_argument("--fixture", help="the af2_tiny golden fixture directory (its logits are the reference)")
    srv.add_argument("--prompts", type=int, default=32, help="random prompts generated per mode")
    srv.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt")
    srv.set_defaults(func=run_serving)
    cmp = sub.add_parser("compare", help="ours against NVIDIA's PyTorch AF2 on the same weights: check, then time")
    cmp.add_argument("--reference", required=True, metavar="DIR",
                     help="a checkout of github.com/NVIDIA/audio-flamingo, branch audio_flamingo_2")
    cmp.add_argument("--reference-deps", default=None, metavar="DIR",
                     help="a folder put on sys.path for the reference's own imports (torchaudio, torchlibrosa, "
                          "einops_exts) when they are not installed")
    weights = cmp.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", default=None, metavar="MODEL_DIR", help="our model directory (any AF2)")
    weights.add_argument("--fixture", default=None,
                         help="the af2_tiny golden fixture directory (the default weights; ../shared/fixtures)")
    cmp.add_argument("--windows", type=int, nargs="+", default=[1, 30], help="window counts for the forward timings")
    cmp.add_argument("--batch", type=int, default=1, help="examples per forward call")
    cmp.add_argument("--prompt-tokens", type=int, default=16)
    cmp.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8], help="batch sizes for generation")
    cmp.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per row (no early stop)")
    cmp.add_argument("--iters", type=int, default=2, help="timed repetitions after the first call (best is kept)")
    cmp.set_defaults(func=run_compare)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "compare" and not args.checkpoint and not args.fixture:
        args.fixture = _fixture_default()
    for name in ("windows", "iters", "batch", "batches", "gen_batches", "prompt_tokens", "tokens"):
        value = getattr(args, name, 1)
        if min(value if isinstance(value, list) else [value]) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if getattr(args, "new_tokens", 2) < 2:
        raise SystemExit("--new-tokens must be at least 2")
    args.func(args)


if __name__ == "__main__":
    main()
