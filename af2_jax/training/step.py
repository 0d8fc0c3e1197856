"""The train step: one optimizer update from one global batch, as a single `jax.jit` over the split model state.

Gradients are taken only for the trainable parameters (the frozen LLM and CLAP get activation gradients but no
weight gradients and no Adam state). The batch is cut into `grad_accum_steps` micro-batches that a `lax.scan` runs
one after the other, summing per-token losses and gradients; the mean is over every target token of the global
batch. Everything stays on device: metrics come back as device scalars the loop reads when it logs.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from af2_jax.training import distributed
from af2_jax.training import loss as token_loss
from af2_jax.training.train_state import MUTABLE, ModelSplit, TrainState

BATCH_KEYS = ("audio", "audio_mask", "input_ids", "attention_mask", "loss_mask")

class Loss(NamedTuple):
    """`fn(model, micro-batch, rng) -> (loss sum, count, {name: scalar})`: the step's loss is the sum over every
    micro-batch divided by the summed count (a mean over the global batch's target tokens, for AF2); each named
    scalar of `metrics` is summed over the micro-batches too."""

    fn: Callable[[nnx.Module, dict[str, jax.Array], jax.Array], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
    metrics: tuple[str, ...] = ()


def af2_loss(*, train_htsat: bool = False, deterministic: bool = True) -> Loss:
    """AF2's next-token loss on the answer tokens: the sum over every target token and their count."""

    def loss_fn(model, micro, rng):
        # HTSAT's training mode (SpecAugment, drop path, fusion crop) is random even when dropout is off
        rngs = None if deterministic and not train_htsat else nnx.Rngs(dropout=rng)
        logits = model(micro["audio"], micro["audio_mask"], micro["input_ids"], micro["attention_mask"],
                       train_htsat=train_htsat, deterministic=deterministic, rngs=rngs)
        loss_sum, count = token_loss.next_token_loss_sum(logits, micro["input_ids"], micro["loss_mask"])
        return loss_sum, count, {"tokens": jnp.sum(micro["attention_mask"]).astype(jnp.float32)}

    return Loss(loss_fn, ("tokens",))


def make_train_step(split: ModelSplit, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    loss: Loss, batch_keys: tuple[str, ...] = BATCH_KEYS,
                    after_update: Callable[[nnx.State], nnx.State] | None = None, seed: int = 0) -> Callable:
    """Pure `step(state, frozen, batch) -> (state, metrics)`; jit it with `jit_train_step`. `after_update` maps
    the updated trainable parameters (AF-CLAP clamps its logit scales there)."""

    def grad_target(trainable, batch_stats, frozen, micro, rng):
        # fresh Variable objects at this trace level: the forward updates BatchStats in place when HTSAT trains
        batch_stats = jax.tree.map(lambda x: x, batch_stats)
        model = split.merge(trainable, batch_stats, frozen)
        loss_sum, count, extra = loss.fn(model, micro, rng)
        return loss_sum, (count, extra, nnx.state(model, MUTABLE))

    grad_fn = jax.value_and_grad(grad_target, has_aux=True)

    def step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array]):
        trainable = state["trainable"]
        step_rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        micro_batches = {k: batch[k] for k in batch_keys}  # (grad_accum_steps, rows, ...) each

        def micro_step(carry, inputs):
            grad_sum, loss_sum, count, extra_sum, batch_stats = carry
            index, micro = inputs
            (micro_loss, (micro_count, extra, batch_stats)), grads = grad_fn(
                trainable, batch_stats, frozen, micro, jax.random.fold_in(step_rng, index))
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            extra_sum = jax.tree.map(jnp.add, extra_sum, extra)
            return (grad_sum, loss_sum + micro_loss, count + micro_count, extra_sum, batch_stats), None

        num_micro = micro_batches[batch_keys[0]].shape[0]
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
        scalar = jnp.zeros((), jnp.float32)
        carry = (zeros, scalar, scalar, {name: scalar for name in loss.metrics}, state["batch_stats"])
        (grad_sum, loss_sum, count, extra_sum, batch_stats), _ = jax.lax.scan(
            micro_step, carry, (jnp.arange(num_micro), micro_batches))

        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grad_sum, trainable)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        if after_update is not None:
            new_trainable = after_update(new_trainable)
        new_state = {"trainable": new_trainable, "batch_stats": batch_stats, "opt_state": opt_state,
                     "step": state["step"] + 1}
        metrics = {"loss": loss_sum / denominator, "grad_norm": optax.global_norm(grads),
                   "learning_rate": jnp.asarray(schedule(state["step"]), jnp.float32),
                   "target_tokens": count, **extra_sum}
        return new_state, metrics

    return step


def jit_train_step(step: Callable, mesh: Mesh, shardings: tuple[Any, Any], batch_keys: tuple[str, ...] = BATCH_KEYS
                   ) -> Callable:
    """`jax.jit` with explicit shardings, the train state donated (updated in place), metrics replicated.

    Call the result under `jax.set_mesh(mesh)` so that activation sharding constraints see the mesh.
    """
    state_shardings, frozen_shardings = shardings
    batch = {k: distributed.batch_sharding(mesh) for k in batch_keys}
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
