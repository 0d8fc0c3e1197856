"""Shared pieces of the stage configs: `stage_config(stage, preset)` fills every field; configs/stageN.py only pick
the stage. Every field can be overridden on the command line (`--config.optimizer.learning_rate=3e-5`).

Real presets (0.5b, 1.5b, 3b) follow the reference recipe (af2_reference.md section 6): AdamW, weight decay 0.1,
constant learning rate after 1875 warmup steps, gradient clipping 1.0, bf16 compute with fp32 master weights,
max_tokens 512; stage 1: 30 s, lr 1e-4, 16 x 2 per GPU; stage 2: 2 min, lr 2e-5, 4 x 2 per GPU; stage 3 (not in the
reference repo): 5 min. Their `batch_size` is for 8 devices; scale it with the device count. The tiny preset trains
the embedded synthetic dataset on CPU in minutes, so its hyper-parameters are its own.
"""
from __future__ import annotations

import ml_collections

# the one stage table: what trains and how long the audio is per stage; training reads the same one
from af2_jax.training.stages import STAGE_TRAINABLE, STAGE_WINDOWS
# Batches pad their audio to the smallest of these window counts that holds every clip (data/bucketing.py): one
# compiled train step per bucket instead of one per window count.
WINDOW_BUCKETS = (1, 2, 3, 6, 12, 18, 24, 30)
STAGE_LEARNING_RATE = {1: 1e-4, 2: 2e-5, 3: 2e-5}
STAGE_ROWS_PER_DEVICE = {1: (16, 2), 2: (4, 2), 3: (1, 2)}  # (micro-batch per device, accumulation steps)
REAL_PRESETS = ("0.5b", "1.5b", "3b")
PRESETS = ("tiny",) + REAL_PRESETS
REFERENCE_DEVICES = 8

# tiny: fp32 on CPU, learning rates and steps its own (docs/RESULTS.md measures each choice). At 1e-3 and above the
# model settles on the text-only answer prior and never uses the audio (not even an injected label); 1.5e-4 learns.
# Stage 2 uses a fifth of it, as the reference does. Stage 3 keeps HTSAT frozen (the reference leaves that open):
# 30-window backward passes through it do not fit a CPU budget. Its 200 steps give long_order ~200 5-minute
# recordings (half the batches replay the short skills). A batch is all long or all short (window buckets), so at a
# constant rate the last few batches decide how much counting survives (56 to 88% between runs); a cosine decay to 0
# ends on the average of both: 92% counting and 80% long_order from the model that gave 56 / 67.5 at constant 1e-4
# (RESULTS.md, session 7).
TINY = {1: dict(learning_rate=1.5e-4, warmup_steps=100, num_steps=1200, batch_size=8, grad_accum_steps=1,
                max_windows=1, schedule="constant"),
        2: dict(learning_rate=3e-5, warmup_steps=10, num_steps=150, batch_size=8, grad_accum_steps=1, max_windows=1,
                schedule="constant"),
        3: dict(learning_rate=1e-4, warmup_steps=10, num_steps=200, batch_size=2, grad_accum_steps=1, max_windows=30,
                schedule="cosine")}
TINY_TRAINABLE = {1: STAGE_TRAINABLE[1], 2: STAGE_TRAINABLE[2], 3: STAGE_TRAINABLE[1]}
# The tiny LLM's embeddings are also its output head (tied), random and small (std 0.02): at the audio side's
# learning rate they need ~700 steps to grow enough to emit an answer at all. Ten times the rate gets there in ~200
# (RESULTS.md); the real presets start from Qwen2.5's trained embeddings and keep one rate, as the reference. Stage 3
# starts from trained embeddings too, and at 10x it lost more counting and learnt less long_order (RESULTS.md).
TINY_LEARNING_RATE_MULTIPLIERS = {1: (("llm/embed_tokens/.*", 10.0),), 2: (("llm/embed_tokens/.*", 10.0),), 3: ()}
TINY_HTSAT_DEPTHS = (2, 2, 2, 2)  # same widths and 64 tokens per window; half the CPU time of (2, 2, 12, 2)


def stage_config(stage: int, preset: str = "tiny") -> ml_collections.ConfigDict:
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    preset = preset or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    tiny = preset == "tiny"
    c = ml_collections.ConfigDict()
    c.task = "af2"  # af2_jax/training/tasks.py (configs/clap.py trains 'afclap')
    c.stage = stage
    c.preset = preset
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        preset=preset,
        compute_dtype="float32" if tiny else "bfloat16",
        # what each component's backward recomputes (af2_jax/models/scan.py REMAT_POLICIES: none, full, dots, or
        # the named save_qkv_proj, save_out_proj, save_qkv_out_proj, save_mlp, minimal): the decoder superblocks
        # (cross-attention + Qwen2 layer), HTSAT's Swin block pairs, the audio transformer's layers
        remat_policy="none" if tiny else "full",
        htsat_remat_policy="none",
        audio_transformer_remat_policy="none",
        scan_unroll=False,
        vocab_from_tokenizer=tiny,  # tiny: the LLM's vocabulary is the synthetic tokenizer's
        htsat_depths=TINY_HTSAT_DEPTHS if tiny else (),  # () = the preset's Swin depths
        # not in AF2 (models/audio_encoder.py): tiny learns temporal order and pitch order only with it (RESULTS.md)
        audio_time_embedding=tiny,
        # bn0 statistics from the run's first batches when it starts from a random HTSAT (training/input_norm.py).
        # Off for tiny: it lifts counting to 96% but leaves pitch at chance (RESULTS.md, session 4).
        calibrate_input_norm=False,
        # > 0: HTSAT's final LayerNorm set so that its tokens over the run's first batches have mean 0 and this
        # standard deviation per channel (training/feature_norm.py), before step 0: a random (or briefly
        # pretrained tiny AF-CLAP) encoder's events then stand out as a pretrained one's do. Tiny: 0.3 keeps the
        # time embedding (amplitude 1) strong enough for pitch to learn early, and counting learns too (RESULTS.md,
        # session 6). Stage 1 only: later stages start from its calibrated HTSAT (a resumed run reads its saved
        # values). 0 = off.
        calibrate_feature_norm=0.3 if tiny and stage == 1 else 0.0,
    ))
    c.trainable = TINY_TRAINABLE[stage] if tiny else STAGE_TRAINABLE[stage]
    c.frozen_param_dtype = "float32" if tiny else "bfloat16"
    c.deterministic = tiny  # real presets train with dropout / SpecAugment where the model has them
    # When HTSAT trains: True runs it in the reference's training mode (per-call BatchNorm statistics that also move
    # the running ones, AFF fusion, SpecAugment, drop path); False fine-tunes its weights in eval mode. The tiny
    # HTSAT is random, not AF-CLAP: its running statistics and fusion branch are uncalibrated, so training-mode
    # features differ from the eval-mode ones stage 1 learned to read, and stage 2 lost pitch (RESULTS.md).
    c.htsat_train_mode = not tiny
    # '' = random (tiny); real stage 1: 'llm=<converted Qwen2.5>,htsat=<converted AF-CLAP>'; stages 2-3: the
    # previous stage's workdir (its final/ export, or its newest checkpoint).
    c.init_from = ""
    # frozen parameters that may keep their random initialisation when init_from loads the others: the tiny LLM is
    # random by design (stage 1 then starts from AF-CLAP's HTSAT alone); a real preset's never is
    c.random_frozen_ok = ("llm/.*",) if tiny else ()
    c.tokenizer = ""  # '' = the synthetic dataset's tiny tokenizer; real presets: the Qwen2.5 tokenizer directory

    c.data = ml_collections.ConfigDict(_default_data(stage, tiny))
    c.max_windows = TINY[stage]["max_windows"] if tiny else STAGE_WINDOWS[stage]
    c.window_buckets = tuple(b for b in WINDOW_BUCKETS if b < c.max_windows) + (c.max_windows,)
    c.max_tokens = 64 if tiny else 512
    c.num_workers = 0 if tiny else 8

    if tiny:
        c.batch_size = TINY[stage]["batch_size"]  # global rows per micro-batch
        c.grad_accum_steps = TINY[stage]["grad_accum_steps"]
        c.num_steps = TINY[stage]["num_steps"]
    else:
        per_device, accumulation = STAGE_ROWS_PER_DEVICE[stage]
        c.batch_size = per_device * REFERENCE_DEVICES
        c.grad_accum_steps = accumulation
        c.num_steps = 100_000

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=TINY[stage]["learning_rate"] if tiny else STAGE_LEARNING_RATE[stage],
        warmup_steps=TINY[stage]["warmup_steps"] if tiny else 1875,
        weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8,  # torch AdamW defaults, as the reference
        clip_grad_norm=1.0,
        schedule=TINY[stage]["schedule"] if tiny else "constant",  # after warmup ('cosine': to 0 at num_steps)
        learning_rate_multipliers=TINY_LEARNING_RATE_MULTIPLIERS[stage] if tiny else (),  # ((path pattern, factor), ...)
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1: all remaining devices
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=100 if tiny else 1000, keep=3, async_save=True,
        preemption_check_every=10,  # multi-host: steps between agreeing on a received SIGTERM
    ))
    c.log_every = 10 if tiny else 50
    c.export_final = True
    return c


def _default_data(stage: int, tiny: bool) -> dict:
    if tiny:
        from af2_jax.data.config import default_synthetic_config
        data = default_synthetic_config("train", stage=stage)
        return dict(data, sources=tuple(data["sources"]))
    # Real data: AF2-format dataset JSONs (af2_reference.md section 6 lists the reference's blends); override with
    # --config.data.sources='({"kind": "manifest", "path": "...", "weight": 1.0}, ...)' (a tuple: ml_collections
    # cannot override list fields from the command line) or edit a copy of this file.
    return {"sources": ()}
