"""The train step: one optimizer update from one global batch, as a single `jax.jit` over the split model state.

Gradients are taken only for the trainable parameters (the frozen LLM and CLAP get activation gradients but no
weight gradients and no Adam state). The batch is cut into `grad_accum_steps` micro-batches that a `lax.scan` runs
one after the other, summing per-token losses and gradients; the mean is over every target token of the global
batch. Everything stays on device: metrics come back as device scalars the loop reads when it logs.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from af2_jax.training import distributed, loss
from af2_jax.training.train_state import MUTABLE, ModelSplit, TrainState

BATCH_KEYS = ("audio", "audio_mask", "input_ids", "attention_mask", "loss_mask")


def make_train_step(split: ModelSplit, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    train_htsat: bool = False, deterministic: bool = True,
                    seed: int = 0) -> Callable:
    """Pure `step(state, frozen, batch) -> (state, metrics)`; jit it with `jit_train_step`."""

    def loss_fn(trainable, batch_stats, frozen, micro, rng):
        # fresh Variable objects at this trace level: the forward updates BatchStats in place when HTSAT trains
        batch_stats = jax.tree.map(lambda x: x, batch_stats)
        model = split.merge(trainable, batch_stats, frozen)
        # HTSAT's training mode (SpecAugment, drop path, fusion crop) is random even when dropout is off
        rngs = None if deterministic and not train_htsat else nnx.Rngs(dropout=rng)
        logits = model(micro["audio"], micro["audio_mask"], micro["input_ids"], micro["attention_mask"],
                       train_htsat=train_htsat, deterministic=deterministic, rngs=rngs)
        loss_sum, count = loss.next_token_loss_sum(logits, micro["input_ids"], micro["loss_mask"])
        return loss_sum, (count, nnx.state(model, MUTABLE))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array]):
        trainable = state["trainable"]
        step_rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        micro_batches = {k: batch[k] for k in BATCH_KEYS}  # (grad_accum_steps, rows, ...) each

        def micro_step(carry, inputs):
            grad_sum, loss_sum, count, batch_stats = carry
            index, micro = inputs
            (micro_loss, (micro_count, batch_stats)), grads = grad_fn(
                trainable, batch_stats, frozen, micro, jax.random.fold_in(step_rng, index))
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, loss_sum + micro_loss, count + micro_count, batch_stats), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
        carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), state["batch_stats"])
        num_micro = micro_batches["input_ids"].shape[0]
        (grad_sum, loss_sum, count, batch_stats), _ = jax.lax.scan(
            micro_step, carry, (jnp.arange(num_micro), micro_batches))

        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grad_sum, trainable)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_state = {"trainable": optax.apply_updates(trainable, updates), "batch_stats": batch_stats,
                     "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {"loss": loss_sum / denominator, "grad_norm": optax.global_norm(grads),
                   "learning_rate": jnp.asarray(schedule(state["step"]), jnp.float32),
                   "target_tokens": count, "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32)}
        return new_state, metrics

    return step


def jit_train_step(step: Callable, mesh: Mesh, shardings: tuple[Any, Any]) -> Callable:
    """`jax.jit` with explicit shardings, the train state donated (updated in place), metrics replicated.

    Call the result under `jax.set_mesh(mesh)` so that activation sharding constraints see the mesh.
    """
    state_shardings, frozen_shardings = shardings
    batch = {k: distributed.batch_sharding(mesh) for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
