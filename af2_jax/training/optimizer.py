"""The optimizer of every stage: AdamW with a constant-after-linear-warmup learning rate, global-norm gradient
clipping, and `optax.multi_transform` so that frozen parameters get zero updates and no Adam moments."""
from __future__ import annotations

from typing import Any, Sequence

import optax

from af2_jax.training import stages


def learning_rate_schedule(cfg: Any) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.learning_rate` over `cfg.warmup_steps`, then constant (the reference's
    `lr_scheduler: constant` with `warmup_steps`)."""
    if cfg.warmup_steps <= 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), optax.constant_schedule(cfg.learning_rate)],
        [cfg.warmup_steps])


def make_optimizer(cfg: Any, trainable_patterns: Sequence[str]) -> optax.GradientTransformation:
    """`cfg` is the config's `optimizer` block (learning_rate, warmup_steps, weight_decay, b1, b2, eps,
    clip_grad_norm). Works on the trainable subset (the train step's case: every leaf is 'train') as well as on
    the full parameter tree (frozen leaves then get no state and zero updates)."""
    train = optax.chain(
        optax.clip_by_global_norm(cfg.clip_grad_norm) if cfg.clip_grad_norm > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )
    return optax.multi_transform({stages.TRAIN: train, stages.FROZEN: optax.set_to_zero()},
                                 stages.param_labels(trainable_patterns))
