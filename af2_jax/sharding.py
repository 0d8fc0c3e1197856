"""The one table of logical axis names -> mesh axes ('data', 'fsdp', 'tensor'), and mesh construction.

Models annotate every parameter with logical names (`nnx.Param(..., out_sharding=('embed', 'mlp'))`) and call
`constrain` on activations at block boundaries; nothing else in the package names a mesh axis.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: dict[str, Any] = {
    # parameters
    "layers": None,  # stacked-layer axis of scanned blocks
    "vocab": "tensor",
    "embed": "fsdp",  # LLM hidden size
    "mlp": "tensor",  # feed-forward inner size
    "heads": "tensor",  # query heads (x head_dim when fused into one dim)
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,  # scales and biases of norms
    "audio_embed": "fsdp",  # audio feature width (HTSAT channels, audio transformer d_model)
    "audio_mlp": "tensor",
    "audio_heads": "tensor",
    "conv": None,  # convolution kernel spatial / input-channel dims
    "bias_table": None,  # relative position bias tables
    # activations
    "act_batch": ("data", "fsdp"),
    "act_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} "
                         f"devices, {len(devices)} are available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _mesh_axes_size(mesh_axes: Any, mesh_shape: dict[str, int]) -> int:
    if mesh_axes is None:
        return 1
    names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    return math.prod(mesh_shape[n] for n in names)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
                    mesh_shape: dict[str, int]) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims carry `logical_axes`.

    A dim whose size the mesh axes do not divide is replicated instead (e.g. AF2's odd vocabulary of 151669 rows
    on tensor=2); a mesh axis is used at most once per array.
    """
    if logical_axes is None:
        return PartitionSpec()
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise KeyError(f"logical axis {name!r} is not in af2_jax.sharding.LOGICAL_AXIS_RULES")
        axes = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        names = tuple(n for n in names if n in mesh_shape and mesh_shape[n] > 1 and n not in used)
        if not names or size % _mesh_axes_size(names, mesh_shape):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def _variable_spec(variable: nnx.Variable, mesh_shape: dict[str, int]) -> PartitionSpec:
    axes = variable.get_metadata().get("out_sharding")
    return logical_to_spec(axes, np.shape(variable.get_value()), mesh_shape)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an `nnx.State` (concrete or abstract), from each Variable's logical axis names."""
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(lambda v: NamedSharding(mesh, _variable_spec(v, mesh_shape)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation, by logical names; a no-op outside a mesh context (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)
