"""The same steps (two micro-batches accumulated) give the same losses and parameters on 1 device and on 8
(fsdp=4 x data=2, and data=2 x fsdp=2 x tensor=2): sharding changes where the work runs, not what it computes."""
import jax
import numpy as np

from af2_jax import sharding
from af2_jax.training import optimizer, step as step_lib, train_state
from af2_jax.training.checkpointing import to_pure
from af2_jax.training.distributed import global_batch
from helpers import RandomBatches, stage_config, tiny_model_factory


def _run(mesh, cfg, steps=2, accumulation=2):
    tx = optimizer.make_optimizer(cfg.optimizer, cfg.trainable)
    split, state, frozen, shardings = train_state.create_train_state(tiny_model_factory(), cfg.trainable, tx, mesh)
    step = step_lib.jit_train_step(step_lib.make_train_step(
        split, tx, optimizer.learning_rate_schedule(cfg.optimizer), train_htsat=True),
        mesh, shardings)
    # 16 rows = 2 micro-batches of 8: at least one row per device (1 row per device with tensor=2 hits a
    # Shardy miscompile on CPU in jax 0.10.2, see docs/TRAINING.md)
    batches = RandomBatches(16)
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, metrics = step(state, frozen, global_batch(next(batches), mesh, accumulation))
            losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, to_pure(state["trainable"]))


def test_one_device_and_eight_devices_agree():
    cfg = stage_config(2)
    reference_losses, reference_params = _run(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), cfg)
    for data, fsdp, tensor in [(2, 4, 1), (2, 2, 2)]:
        losses, params = _run(sharding.make_mesh(data, fsdp, tensor), cfg)
        np.testing.assert_allclose(losses, reference_losses, rtol=0, atol=1e-5, err_msg=f"{data}x{fsdp}x{tensor}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, reference_params)
    assert reference_losses[1] != reference_losses[0]  # the second step saw updated parameters
