"""Orbax checkpoints of a training run: async, the last N kept, resumable on any mesh.

A checkpoint (one step directory under `<workdir>/checkpoints`) holds two items:
    state   the TrainState as a pure nested dict of arrays: trainable params, BatchNorm statistics, optimizer state,
            step (no nnx.Variable objects, no typed RNG keys: the step's randomness is derived from seed and step)
    data    each process's data iterator state as JSON (grain's checkpoint handler, one file per process)
Frozen parameters are not saved: they never change and come back from `init_from` on restart.

Restoring reads into an abstract target whose leaves carry the *current* mesh's shardings, so a run can resume on
a different mesh or topology. If the newest checkpoint cannot be read it is moved aside with a warning and the
previous one is used.
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any

import grain.checkpoint as grain_checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from af2_jax.param_tree import from_pure, path_string, to_pure

STATE, DATA = "state", "data"


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """Abstract tree (Variables of ShapeDtypeStructs) + matching shardings -> pure dict of sharded ShapeDtypeStructs,
    the restore target."""
    def one(sharding, leaf):
        value = leaf.get_value() if _is_variable(leaf) else leaf
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    return to_pure(jax.tree.map(one, shardings, abstract, is_leaf=_is_variable))


class _JsonIterator:
    """Presents any iterator with JSON-able get_state()/set_state() to grain's handler (which stores bytes)."""

    def __init__(self, iterator):
        self.iterator = iterator

    def get_state(self) -> bytes:
        state = self.iterator.get_state()
        return state if isinstance(state, bytes) else json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        inner = self.iterator.get_state()
        self.iterator.set_state(state if isinstance(inner, bytes) else json.loads(state.decode()))

    def start_prefetch(self) -> None:  # grain's handler calls it after restoring
        start = getattr(self.iterator, "start_prefetch", None)
        if start is not None:
            start()


class Checkpointer:
    """The run's CheckpointManager: `save` every `save_every` steps (or when forced), keeps the last `keep`."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, save_every: int = 100,
                 async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
        """Starts an (async) save of `state` at `step` if the interval says so or `force`; True if it started."""
        if step in self.manager.all_steps():
            return False
        items = {STATE: ocp.args.PyTreeSave(to_pure(state))}
        if data_iterator is not None:
            items[DATA] = grain_checkpoint.CheckpointSave(_JsonIterator(data_iterator))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, shardings: Any, data_iterator: Any = None,
                step: int | None = None) -> tuple[Any, int] | None:
        """The newest readable checkpoint (or `step`) restored onto `shardings` -> (state, step); None if there is
        none. `data_iterator`, when given, is set to the saved position."""
        target = abstract_with_shardings(abstract_state, shardings)
        candidates = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        for candidate in candidates:
            items = {STATE: ocp.args.PyTreeRestore(item=target,
                                                   restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
            if data_iterator is not None:
                items[DATA] = grain_checkpoint.CheckpointRestore(_JsonIterator(data_iterator))
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001  (any unreadable file: fall back to the previous checkpoint)
                if step is not None:
                    raise
                logging.warning("checkpoint %d in %s cannot be restored (%s: %s); moving it aside and falling back "
                                "to the previous one", candidate, self.directory, type(e).__name__, e)
                self._move_aside(candidate)
                continue
            return from_pure(restored[STATE], abstract_state), candidate
        return None

    def _move_aside(self, step: int) -> None:
        """Renames a bad step directory to `<dir>.corrupt/<step>` (kept for inspection) so that the step can be
        saved again."""
        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + ".corrupt")
            aside.mkdir(parents=True, exist_ok=True)
            source = self.directory / str(step)
            if source.exists():
                shutil.move(str(source), str(aside / f"{step}"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"af2_move_aside_{step}")
        self.manager.reload()

    def read_params(self, step: int | None = None) -> dict[str, np.ndarray]:
        """Trainable params and BatchNorm statistics of a checkpoint as flat '/'-pathed host arrays (to start a new
        stage from an unfinished previous one): a partial restore that skips the optimizer state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        # a fresh manager knows no handler for the 'state' item yet (its item_metadata is None): ask the PyTree
        # handler directly
        metadata = ocp.PyTreeCheckpointer().metadata(self.directory / str(step) / STATE)
        metadata = getattr(metadata, "item_metadata", metadata)
        tree = metadata.tree if hasattr(metadata, "tree") else metadata
        wanted = {k: tree[k] for k in ("trainable", "batch_stats") if k in tree}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = self.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True)}))[STATE]
        flat: dict[str, np.ndarray] = {}
        for group in restored.values():
            for path, leaf in jax.tree_util.tree_flatten_with_path(group)[0]:
                flat[path_string(path)] = np.asarray(leaf)
        return flat

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
