"""Each stage changes exactly the reference's trainable modules (af2_reference.md section 6) and leaves every other
parameter bitwise unchanged; BatchNorm statistics move only when HTSAT trains."""
import jax
import numpy as np
import pytest
from flax import nnx

from af2_jax import sharding
from af2_jax.training import optimizer, step as step_lib, train_state
from af2_jax.training.checkpointing import to_pure
from af2_jax.training.stages import path_string
from helpers import RandomBatches, stage_config, tiny_model_factory

# written from the reference's list, independently of af2_jax.training.stages
REFERENCE_TRAINABLE_PREFIXES = {1: ("audio_transformer/", "xattn/", "llm/embed_tokens/"),
                                2: ("audio_transformer/", "xattn/", "llm/embed_tokens/", "htsat/")}


def _flat(tree):
    return {path_string(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(to_pure(tree))[0]}


@pytest.mark.parametrize("stage", [1, 2])
def test_only_the_stage_trainable_parameters_change(stage):
    cfg = stage_config(stage)
    mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
    tx = optimizer.make_optimizer(cfg.optimizer, cfg.trainable)
    split, state, frozen, shardings = train_state.create_train_state(tiny_model_factory(), cfg.trainable, tx, mesh)
    before = {**_flat(state["trainable"]), **_flat(frozen)}
    stats_before = _flat(state["batch_stats"])
    step = step_lib.jit_train_step(step_lib.make_train_step(
        split, tx, optimizer.learning_rate_schedule(cfg.optimizer), train_htsat=stage == 2), mesh, shardings)
    batches = RandomBatches(4)
    from af2_jax.training.distributed import global_batch
    with jax.set_mesh(mesh):
        for _ in range(2):
            state, _ = step(state, frozen, global_batch(next(batches), mesh))
    model = split.merge(state["trainable"], state["batch_stats"], frozen)
    after = _flat(nnx.state(model, nnx.Param))
    stats_after = _flat(nnx.state(model, nnx.BatchStat))

    assert set(after) == set(before)
    trainable = {p for p in after if p.startswith(REFERENCE_TRAINABLE_PREFIXES[stage])}
    assert trainable and len(trainable) < len(after)
    for path in sorted(after):
        if path in trainable:
            assert not np.array_equal(after[path], before[path]), f"{path} should train in stage {stage}"
        else:
            assert after[path].dtype == before[path].dtype
            assert np.array_equal(after[path], before[path]), f"{path} must stay frozen in stage {stage}"
    assert stats_after.keys() == stats_before.keys() and stats_before
    changed_stats = [p for p in stats_after if not np.array_equal(stats_after[p], stats_before[p])]
    assert (len(changed_stats) == len(stats_after)) if stage == 2 else not changed_stats
