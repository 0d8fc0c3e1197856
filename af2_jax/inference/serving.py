"""Serving weights: a model loaded in the serving dtype, placed on a mesh by the sharding table, and optionally
int8 weight-only quantised.

- dtype: `pretrained.load_model(..., dtype=jnp.bfloat16)` computes in bf16 and reads the weights into bf16 (the
  audio keys/values that generation caches follow the compute dtype).
- mesh: with `fsdp`/`tensor` > 1 every weight is split as `af2_jax.sharding` says and each device reads only its
  shards from the checkpoint, so a model too big for one device loads onto several; `generate_tokens` then runs on
  the weights' mesh (`model_mesh`) with the batch split over its data axes.
- int8: the decoder's matrices (LLM and cross-attention: what every generated token reads) become int8 with one
  fp scale per output channel (symmetric, absmax / 127). The model code does not change: an `Int8Weight` stands
  where the array was and dequantises when a layer reads it (`kernel[...]`), inside the layer scan, so only one
  layer's matrices exist in the compute dtype at a time. The audio encoder runs once per prompt and stays as is.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from af2_jax import param_tree, sharding

DTYPES = ("float32", "bfloat16")
QUANTIZATIONS = ("none", "int8")
# Decoder weights that are quantised: path prefix -> {parameter name: the axis summed over (the input features)}.
# Embedding rows are scaled one per token, which is also one per output of the tied logits head.
_INT8_AXES = {"llm/": {"kernel": -2, "embedding": -1}, "xattn/": {"kernel": -2, "to_kv": -3}}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """An int8 matrix `q` and its scales (`q`'s shape with the summed-over axis of size 1); reading it
    (`weight[...]`) gives q * scale in the scale's dtype."""

    q: jax.Array
    scale: jax.Array

    def __getitem__(self, key):
        return (self.q.astype(self.scale.dtype) * self.scale)[key]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self):
        return self.scale.dtype


@functools.partial(jax.jit, static_argnames=("axis",))
def quantize_int8(weight: jax.Array, axis: int) -> Int8Weight:
    """Symmetric int8 with one scale per slice along `axis` summed over: scale = max|w| / 127 (1 for an all-zero
    slice), q = round(w / scale); the scale keeps `weight`'s dtype."""
    w = weight.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axis, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return Int8Weight(q, scale.astype(weight.dtype))


def int8_axis(path: str) -> int | None:
    """The summed-over axis of a quantised parameter ('/'-path), None for one that stays as it is."""
    for prefix, names in _INT8_AXES.items():
        if path.startswith(prefix):
            return names.get(path.rsplit("/", 1)[-1])
    return None


def quantize_weights(model: nnx.Module) -> list[str]:
    """Replaces the decoder's matrices of `model` by `Int8Weight`s in place (sharded weights stay on their
    devices); returns the quantised paths."""
    done = []
    state = nnx.state(model, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        name = param_tree.path_string(path)
        axis = int8_axis(name)
        value = variable.get_value()
        if axis is None or isinstance(value, Int8Weight):
            continue
        variable.set_value(quantize_int8(value, axis))
        done.append(name)
    if not done:
        raise ValueError(f"{type(model).__name__} has no llm/ or xattn/ weights to quantise (int8 serving is for AF2 models)")
    nnx.update(model, state)
    return done


def model_mesh(model: nnx.Module) -> Mesh | None:
    """The mesh of more than one device that the model's weights are placed on, None otherwise."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        placement = getattr(leaf, "sharding", None)
        if isinstance(placement, NamedSharding) and placement.mesh.size > 1:
            return placement.mesh
    return None


def serving_mesh(fsdp: int = 1, tensor: int = 1, data: int = -1) -> Mesh | None:
    """A ('data', 'fsdp', 'tensor') mesh over this process's devices (data takes what fsdp x tensor leave), or
    None when it would be one device."""
    devices = jax.local_devices()
    if fsdp < 1 or tensor < 1 or len(devices) % (fsdp * tensor):
        raise ValueError(f"--fsdp {fsdp} x --tensor {tensor} must divide the {len(devices)} local devices")
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=devices)
    return mesh if mesh.size > 1 else None


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    dtype: str = "float32"
    quantize: str = "none"
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"serving dtype {self.dtype!r}: choose one of {DTYPES}")
        if self.quantize not in QUANTIZATIONS:
            raise ValueError(f"quantisation {self.quantize!r}: choose one of {QUANTIZATIONS}")

    @property
    def sharded(self) -> bool:
        return self.fsdp * self.tensor > 1


def load_serving_model(path: str | os.PathLike, options: ServingOptions = ServingOptions()) -> nnx.Module:
    """The model at `path` (a model directory or a workdir) as `options` say: dtype, then placement, then int8.
    Unsharded, it is left on the default device (generation copies it data-parallel onto the devices)."""
    from af2_jax import pretrained

    mesh = serving_mesh(options.fsdp, options.tensor) if options.sharded else None
    dtype = None if options.dtype == "float32" else getattr(jnp, options.dtype)
    model = pretrained.load_model(path, mesh=mesh, dtype=dtype)
    if options.quantize == "int8":
        quantize_weights(model)
    return model


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype, --quantize, --fsdp and --tensor, the same for every command that generates."""
    group = parser.add_argument_group("serving")
    group.add_argument("--dtype", choices=DTYPES, default="float32",
                       help="compute dtype and weight dtype the model is loaded in (bfloat16: half the memory)")
    group.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                       help="int8: the decoder's matrices as int8 with per-channel scales (weight-only)")
    group.add_argument("--fsdp", type=int, default=1,
                       help="split the weights over this many devices (fsdp axis), for a model one cannot hold")
    group.add_argument("--tensor", type=int, default=1, help="tensor-parallel ways (heads and MLP split)")


def serving_options(args: argparse.Namespace) -> ServingOptions:
    return ServingOptions(dtype=args.dtype, quantize=args.quantize, fsdp=args.fsdp, tensor=args.tensor)
