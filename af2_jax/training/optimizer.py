"""The optimizer of every stage: AdamW with a linear warmup then a constant (the reference's) or cosine-decaying
learning rate, global-norm gradient clipping, and `optax.multi_transform` so that frozen parameters get zero updates
and no Adam moments."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import optax

from af2_jax import param_tree
from af2_jax.training import stages


def learning_rate_schedule(cfg: Any, num_steps: int | None = None) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.learning_rate` over `cfg.warmup_steps`, then `cfg.schedule`: 'constant' (the
    default: the reference's `lr_scheduler: constant` with `warmup_steps`) or 'cosine', down to 0 at `num_steps`."""
    kind = cfg.schedule
    warmup = max(int(cfg.warmup_steps), 0)
    if kind == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif kind == "cosine":
        if num_steps is None:
            raise ValueError("the cosine schedule needs the run's num_steps")
        # a run shorter than its warmup never reaches the decay
        after = optax.cosine_decay_schedule(cfg.learning_rate, max(num_steps - warmup, 1))
    else:
        raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {kind!r}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


def learning_rate_multipliers(multipliers: Sequence[Sequence[Any]]) -> optax.GradientTransformation:
    """Scales the updates of the parameters whose path matches a pattern: `((pattern, factor), ...)`, the first
    matching pattern wins. After AdamW this is a per-group learning rate (weight decay scaled with it, as a torch
    param group's `lr`)."""
    rules = [(stages.PathMatcher([pattern]), float(factor)) for pattern, factor in multipliers]

    def factors(tree):
        def factor(path, _):
            path = param_tree.leaf_path_string(path)
            return next((f for match, f in rules if match(path)), 1.0)
        return jax.tree_util.tree_map_with_path(factor, tree)

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * f, updates, factors(updates)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: Any, trainable_patterns: Sequence[str], num_steps: int | None = None
                   ) -> optax.GradientTransformation:
    """`cfg` is the config's `optimizer` block (learning_rate, warmup_steps, weight_decay, b1, b2, eps,
    clip_grad_norm, optional schedule and learning_rate_multipliers); `num_steps` ends a cosine schedule. Works on
    the trainable subset (the train step's case: every leaf is 'train') as well as on the full parameter tree
    (frozen leaves then get no state and zero updates)."""
    train = optax.chain(
        optax.clip_by_global_norm(cfg.clip_grad_norm) if cfg.clip_grad_norm > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay),
        learning_rate_multipliers(cfg.learning_rate_multipliers),
    )
    return optax.multi_transform({stages.TRAIN: train, stages.FROZEN: optax.set_to_zero()},
                                 stages.param_labels(trainable_patterns))
