"""AF-CLAP contrastive pretraining (af2_jax/training/tasks.py 'afclap'): `--config configs/clap.py:PRESET` with
PRESET tiny | large, trained by the same loop as the curriculum (launch/train.py).

    python launch/train.py --config configs/clap.py:tiny --workdir runs/clap
    python launch/train.py --config configs/stage1.py:tiny --workdir runs/s1 --config.init_from=htsat=runs/clap

Per clip, `num_positives` captions (paraphrases) and `num_negatives` composition-swapped negatives (order,
attribute and count swaps; af2_jax/data/captions.py); `composition_negatives=False` trains LAION's plain loss on each
clip's first caption instead. The exported model (<workdir>/final) is an AF-CLAP model in our format whose
`htsat/` initialises AF2 (`--config.init_from=htsat=<workdir>`).

large: HTSAT-large + Flan-T5-large, joint width 512, bf16 compute; LAION's recipe (AdamW lr 1e-4 after 3200 warmup
steps, cosine, weight decay 0: afclap_reference.md section 4) on caption manifests (`--config.data.sources=...`,
kind 'caption_manifest') and the Flan-T5 tokenizer (`--config.tokenizer=<dir with tokenizer.json>`).
"""
import ml_collections

# tiny: the tiny curriculum's HTSAT (same widths, depths (2, 2, 2, 2)) so that its audio half initialises it; a
# narrow T5 (the text side only has to tell a few dozen caption words apart)
TINY_T5 = dict(d_model=128, d_kv=32, num_heads=2, num_layers=2, d_ff=256)


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in ("tiny", "large"):
        raise ValueError(f"unknown preset {preset!r}; choose one of ('tiny', 'large')")
    tiny = preset == "tiny"
    c = ml_collections.ConfigDict()
    c.task = "afclap"
    c.stage = 0  # before the curriculum's stage 1
    c.preset = preset
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        preset=preset,
        compute_dtype="float32" if tiny else "bfloat16",
        htsat_depths=(2, 2, 2, 2) if tiny else (),
        htsat_remat_policy="none" if tiny else "full",
        t5_remat_policy="none" if tiny else "full",
        t5_overrides=TINY_T5 if tiny else {},
        overrides={},  # AFCLAPConfig fields (joint_dim, ...)
        vocab_from_tokenizer=tiny,
    ))
    c.trainable = (".*",)  # everything: both encoders, both projections, the transforms and the logit scales
    c.frozen_param_dtype = "float32"
    c.deterministic = tiny
    c.init_from = ""
    c.random_frozen_ok = ()  # nothing is frozen
    c.tokenizer = ""  # '' = the synthetic captions' word-level tokenizer (tiny); large: a Flan-T5 tokenizer.json
    c.num_positives = 2 if tiny else 1
    c.num_negatives = 3
    c.composition_negatives = True
    c.data = ml_collections.ConfigDict(dict(sources=(
        dict(kind="synthetic_captions", split="train", num_examples=20000, seed=0, weight=1.0),) if tiny else ()))
    c.num_workers = 0 if tiny else 8
    c.batch_size = 16 if tiny else 512
    c.grad_accum_steps = 1
    c.num_steps = 300 if tiny else 100_000
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=5e-4 if tiny else 1e-4, warmup_steps=20 if tiny else 3200, schedule="cosine",
        weight_decay=0.0, b1=0.9, b2=0.999 if tiny else 0.99, eps=1e-8 if tiny else 1e-6, clip_grad_norm=1.0,
        learning_rate_multipliers=()))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100 if tiny else 1000, keep=3, async_save=True,
                                                  preemption_check_every=10))
    c.log_every = 10 if tiny else 50
    c.export_final = True
    return c
