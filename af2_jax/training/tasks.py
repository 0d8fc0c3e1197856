"""What a run trains, chosen by the run config's `task`: 'af2' (a curriculum stage) or 'afclap' (AF-CLAP's
contrastive pretraining). The loop (loop.py) is the same for both, with its mesh, Orbax checkpoints, exact resume,
progress and TensorBoard; a task says only what differs:

    tokenizer(cfg)                      AF2's text tokenizer, or AF-CLAP's T5-style one
    model_config(cfg, tokenizer)        the model config the run builds (AF2Config / AFCLAPConfig)
    build(config, seed)                 a zero-argument constructor of the model
    loss(cfg, trainable)                step.Loss: what one micro-batch contributes
    batch_keys                          the batch arrays the step reads
    iterator(cfg, tokenizer, rows)      the Grain pipeline of this process's rows
    after_update(trainable)             applied after every optimizer update (AF-CLAP clamps its logit scales)
"""
from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax.training import initialization, step as step_lib


class AF2Task:
    name = "af2"
    batch_keys = step_lib.BATCH_KEYS

    def tokenizer(self, cfg: Any):
        from af2_jax.tokenizer import load_tokenizer
        return load_tokenizer(cfg.tokenizer)

    def model_config(self, cfg: Any, tokenizer: Any):
        return initialization.model_config(cfg.model, max_windows=cfg.max_windows, tokenizer=tokenizer)

    def build(self, config: Any, seed: int):
        return initialization.model_factory(config, seed)

    def loss(self, cfg: Any, trainable: tuple[str, ...]) -> step_lib.Loss:
        return step_lib.af2_loss(train_htsat=cfg.htsat_train_mode and any(p.startswith("htsat") for p in trainable),
                                 deterministic=cfg.deterministic)

    def iterator(self, cfg: Any, tokenizer: Any, rows: int) -> Iterator[dict]:
        from af2_jax.data.pipeline import make_iterator
        return make_iterator(cfg.data, tokenizer, seed=cfg.seed, batch_size=rows, max_windows=cfg.max_windows,
                             max_tokens=cfg.max_tokens, process_index=jax.process_index(),
                             process_count=jax.process_count(), num_workers=cfg.num_workers,
                             window_buckets=tuple(cfg.window_buckets))

    def after_update(self, trainable: nnx.State) -> nnx.State:
        return trainable


CLAP_BATCH_KEYS = ("mel_fusion", "longer", "text_ids", "text_mask", "negative_valid")


def clap_loss(*, num_positives: int, num_negatives: int, composition: bool, deterministic: bool) -> step_lib.Loss:
    """AF-CLAP's contrastive loss of one micro-batch (training/clap_loss.py): with `composition`, every audio's M
    captions against all positives plus its own N order/attribute-swapped negatives; otherwise LAION's symmetric
    loss on each row's first caption. The loss is a mean over the micro-batch (count 1): a contrastive batch is not
    a sum of per-row terms, so accumulated micro-batches are averaged."""
    from af2_jax.training import clap_loss as losses

    def loss_fn(model, micro, rng):
        rows, texts, length = micro["text_ids"].shape
        rngs = None if deterministic else nnx.Rngs(dropout=rng)
        audio = model.audio_embedding(micro["mel_fusion"], micro["longer"])
        if composition:
            text = model.text_embedding(micro["text_ids"].reshape(rows * texts, length),
                                        micro["text_mask"].reshape(rows * texts, length),
                                        deterministic=deterministic, rngs=rngs).reshape(rows, texts, -1)
            value = losses.composition_loss(audio, text, model.logit_scale_a[...], num_positives=num_positives,
                                            num_negatives=num_negatives, negative_valid=micro["negative_valid"])
        else:
            text = model.text_embedding(micro["text_ids"][:, 0], micro["text_mask"][:, 0],
                                        deterministic=deterministic, rngs=rngs)
            value = losses.clip_loss(audio, text, model.logit_scale_a[...])
        return value, jnp.ones((), jnp.float32), {"logit_scale": jnp.exp(model.logit_scale_a[...])}

    return step_lib.Loss(loss_fn, ("logit_scale",))


class ClapTask:
    name = "afclap"
    batch_keys = CLAP_BATCH_KEYS

    def tokenizer(self, cfg: Any):
        if cfg.tokenizer:
            from af2_jax.clap_tokenizer import ClapTokenizer
            return ClapTokenizer.from_file(cfg.tokenizer)
        from af2_jax.data.captions import synthetic_caption_tokenizer
        return synthetic_caption_tokenizer()

    def model_config(self, cfg: Any, tokenizer: Any):
        from af2_jax.models.afclap import afclap_preset

        dtype = initialization.DTYPES[cfg.model.compute_dtype]
        htsat = dict(remat_policy=cfg.model.htsat_remat_policy)
        if tuple(cfg.model.htsat_depths):
            htsat["depths"] = tuple(cfg.model.htsat_depths)
        t5 = dict(cfg.model.t5_overrides, remat_policy=cfg.model.t5_remat_policy)
        if cfg.model.vocab_from_tokenizer:
            t5["vocab_size"] = tokenizer.vocab_size
        config = afclap_preset(cfg.model.preset, htsat=htsat, t5=t5, dtype=dtype, param_dtype=jnp.float32,
                               **dict(cfg.model.overrides))
        if config.t5.vocab_size < tokenizer.vocab_size:
            raise initialization.InitFromError(f"the text tokenizer has {tokenizer.vocab_size} tokens, the T5 "
                                               f"embedding {config.t5.vocab_size} rows")
        return config

    def build(self, config: Any, seed: int):
        from af2_jax.models.afclap import AFCLAPModel
        return lambda: AFCLAPModel(config, rngs=nnx.Rngs(seed))

    def loss(self, cfg: Any, trainable: tuple[str, ...]) -> step_lib.Loss:
        return clap_loss(num_positives=cfg.num_positives, num_negatives=cfg.num_negatives,
                         composition=cfg.composition_negatives, deterministic=cfg.deterministic)

    def iterator(self, cfg: Any, tokenizer: Any, rows: int) -> Iterator[dict]:
        from af2_jax.data.clap_pipeline import make_clap_iterator
        return make_clap_iterator(cfg.data, tokenizer, seed=cfg.seed, batch_size=rows,
                                  num_positives=cfg.num_positives, num_negatives=cfg.num_negatives,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  num_workers=cfg.num_workers)

    def after_update(self, trainable: nnx.State) -> nnx.State:
        """The reference clamps both log scales to [0, ln 100] after every optimizer step."""
        from af2_jax.training.clap_loss import clamp_logit_scale

        for name in ("logit_scale_a", "logit_scale_t"):
            if name in trainable:
                trainable[name] = trainable[name].replace(clamp_logit_scale(trainable[name].get_value()))
        return trainable


TASKS = {"af2": AF2Task(), "afclap": ClapTask()}


def task_of(cfg: Any):
    """The run config's task."""
    name = cfg.task
    if name not in TASKS:
        raise ValueError(f"config: task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]

