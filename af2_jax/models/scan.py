"""Stacked layers: create N identical blocks as one module whose variables have a leading 'layers' axis, and run
them with `jax.lax.scan` so compile time does not grow with depth. Rematerialisation policy is chosen by name.

Named policies (MaxText's idea): every model tags its projection outputs with `tag(x, name)` (one vocabulary,
`REMAT_NAMES`: what a projection is, not where it is: the LLM's, the cross-attention's and the audio encoder's
query projections are all 'query_proj'); a `save_*` policy keeps only those outputs for the backward pass and
recomputes the rest of the block."""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

# outputs of: the query / key / value projections, HTSAT's fused one, the attention output projection, the
# feed-forward's first (up, gate) and last (down) matrices
REMAT_NAMES = ("query_proj", "key_proj", "value_proj", "qkv_proj", "out_proj", "mlp_in", "mlp_out")
_save = jax.checkpoint_policies.save_only_these_names

REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # keep every activation (no remat)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight-matmul outputs
    "save_qkv_proj": _save("query_proj", "key_proj", "value_proj", "qkv_proj"),
    "save_out_proj": _save("out_proj"),
    "save_qkv_out_proj": _save("query_proj", "key_proj", "value_proj", "qkv_proj", "out_proj"),
    "save_mlp": _save("mlp_in", "mlp_out"),
    "minimal": _save(*REMAT_NAMES),  # every named projection: like "dots", without the unnamed matmuls
}


def tag(x: jax.Array, name: str) -> jax.Array:
    """Names an activation for the `save_*` remat policies (the identity otherwise)."""
    if name not in REMAT_NAMES:
        raise ValueError(f"unknown remat name {name!r}; choose one of {REMAT_NAMES}")
    return checkpoint_name(x, name)


def stack(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` independently initialised copies of `make_layer(rngs)` stacked into one module."""
    keys = jax.random.split(rngs.params(), num_layers)

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(key):
        return make_layer(nnx.Rngs(params=key))

    return create(keys)


def scan(stacked: nnx.Module | tuple[nnx.Module, ...], body: Callable, carry: Any, xs: Any = None, *,
         remat_policy: str = "none", unroll: bool = False) -> tuple[Any, Any]:
    """Runs `body(layer, carry, x) -> (carry, y)` over the stacked layers (and the leading axis of `xs`).

    `stacked` may be a tuple of stacked modules of equal depth (e.g. a cross-attention block and a decoder layer
    forming one superblock); `body` then receives a tuple of layers. The layers must not be mutated in `body`.
    `unroll=True` unrolls the loop fully (faster step on some backends, slower compile).
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
    modules = stacked if isinstance(stacked, tuple) else (stacked,)
    splits = [nnx.split(m) for m in modules]
    graphdefs = [g for g, _ in splits]
    states = [s for _, s in splits]
    num_layers = jax.tree.leaves(states[0])[0].shape[0]

    def step(carry, inputs):
        layer_states, x = inputs
        layers = tuple(nnx.merge(g, s) for g, s in zip(graphdefs, layer_states))
        return body(layers if isinstance(stacked, tuple) else layers[0], carry, x)

    if remat_policy != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    return jax.lax.scan(step, carry, (states, xs), unroll=num_layers if unroll else 1)
