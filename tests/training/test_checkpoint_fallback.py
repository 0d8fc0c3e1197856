"""A corrupt newest checkpoint is moved aside with a warning and the previous one is restored (state and data
iterator position); the pure-dict conversion round-trips optimizer states exactly."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from af2_jax import param_tree
from af2_jax.training import checkpointing
from helpers import RandomBatches


def _state(value):
    params = {"w": jnp.full((4, 3), value, jnp.float32), "b": jnp.arange(3.0) * value}
    opt_state = optax.adamw(1e-3).init(params)
    return {"trainable": params, "opt_state": opt_state, "step": jnp.int32(value)}


def test_pure_dict_round_trip_of_optimizer_state():
    state = _state(2.0)
    back = param_tree.from_pure(param_tree.to_pure(state), state)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, back, state)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    checkpointer = checkpointing.Checkpointer(tmp_path / "checkpoints", keep=3, save_every=1, async_save=False)
    iterator = RandomBatches(2)
    for step in (1, 2):
        next(iterator)
        checkpointer.save(step, _state(float(step)), iterator, force=True)
    checkpointer.wait()
    # corrupt step 2: truncate every array data file of its state
    data_files = [p for p in (tmp_path / "checkpoints" / "2" / "state").rglob("*") if p.is_file()
                  and "manifest" not in p.name and p.stat().st_size > 0 and "d" in p.parent.name]
    assert data_files
    for p in data_files:
        p.write_bytes(b"\0garbage")

    fresh = RandomBatches(2)
    replicated = jax.tree.map(lambda _: NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)),
                                                      PartitionSpec()), _state(0.0))
    with caplog.at_level(logging.WARNING):
        restored, step = checkpointer.restore(_state(0.0), replicated, fresh)
    checkpointer.close()
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, restored, _state(1.0))
    assert fresh.index == 1
    assert any("cannot be restored" in r.message for r in caplog.records)
    assert (tmp_path / "checkpoints.corrupt" / "2").is_dir()
