"""Multi-host plumbing: starting `jax.distributed`, and turning each host's numpy batch into one global jax.Array
sharded over the mesh's batch axes."""
from __future__ import annotations

import logging
import os
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over data and fsdp, replicated over tensor

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
              "OMPI_COMM_WORLD_SIZE")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """`jax.distributed.initialize()` when this looks like a multi-host job (explicit arguments, SLURM, TPU pod,
    or JAX_COORDINATOR_ADDRESS); a no-op for a single process. Must run before anything touches a device."""
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    elif any(os.environ.get(k) for k in _ENV_HINTS) and os.environ.get("AF2_SINGLE_PROCESS") != "1":
        try:  # cluster auto-detection (SLURM, TPU pods, Open MPI)
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) == 1:
                logging.info("single-task SLURM job, not initialising jax.distributed (%s)", e)
            else:
                raise
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Micro-batched arrays (micro-batch, rows, ...): rows over ('data', 'fsdp'); the other dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def split_micro_batches(batch: Mapping[str, np.ndarray], num_micro: int) -> dict[str, np.ndarray]:
    """(R, ...) -> (num_micro, R // num_micro, ...) on the host; micro-batch m = rows m, m + num_micro, ...

    Done here rather than inside the step so that no sharded dimension is reshaped on device; strided so that the
    global micro-batches are the same whatever the number of processes (each host's R is a multiple of num_micro).
    """
    out = {}
    for k, x in batch.items():
        if x.shape[0] % num_micro:
            raise ValueError(f"{k}: {x.shape[0]} rows are not divisible into {num_micro} micro-batches")
        out[k] = np.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)
    return out


def common_window_count(batch: Mapping[str, np.ndarray]) -> int:
    """The window count every host must pad its batch to (hosts bucket independently). One small all-gather
    outside the train step, only when there are several processes."""
    windows = int(batch["audio"].shape[1])
    if jax.process_count() == 1:
        return windows
    return int(np.max(multihost_utils.process_allgather(np.int32(windows))))


def pad_windows(batch: Mapping[str, np.ndarray], windows: int) -> dict[str, np.ndarray]:
    """Appends all-zero, masked-out windows up to `windows` (what the reference's collator does)."""
    batch = dict(batch)
    extra = windows - batch["audio"].shape[1]
    if extra > 0:
        batch["audio"] = np.pad(batch["audio"], ((0, 0), (0, extra), (0, 0)))
        batch["audio_mask"] = np.pad(batch["audio_mask"], ((0, 0), (0, extra)))
    return batch


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, grad_accum_steps: int = 1
                 ) -> dict[str, jax.Array]:
    """This host's rows -> global (micro-batch, rows, ...) arrays (rows of all hosts concatenated in process
    order)."""
    if "audio" in local_batch:  # AF2 batches: hosts bucket their window counts independently
        local_batch = pad_windows(local_batch, common_window_count(local_batch))
    local_batch = split_micro_batches(local_batch, grad_accum_steps)
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
