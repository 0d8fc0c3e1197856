"""Next-token cross-entropy on the answer span only, in fp32.

`loss_mask` is aligned with `input_ids` (1 where that token is a target), so position t's logits are scored against
token t+1 wherever `loss_mask[t+1]` is 1. The step returns the *sum* and the *count* so that the mean is taken over
every target token of the whole batch and of all gradient-accumulation micro-batches, not as a mean of means.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss_sum(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of per-token negative log-likelihoods over target tokens, number of target tokens), both fp32 scalars.

    logits (B, T, V), input_ids (B, T) int, loss_mask (B, T) float.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    return jnp.sum(nll * mask), jnp.sum(mask)
