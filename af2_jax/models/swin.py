"""Swin transformer blocks and stages as HTSAT stacks them: pre-LN blocks over (shifted) windows with stochastic
depth, blocks scanned in (unshifted, shifted) pairs, PatchMerging between stages."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax import sharding
from af2_jax.models import scan as scan_lib
from af2_jax.models.htsat_config import HTSATConfig
from af2_jax.models.layers import Dense, LayerNorm
from af2_jax.models.torch_layers import trunc_normal
from af2_jax.models.window_attention import (WindowAttention, merge_windows, partition_windows,
                                             relative_position_index, shift_attention_mask)


def drop_path(x: jax.Array, rate: jax.Array | float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: zero a residual branch per sample (leading axis) with probability `rate`, else scale it."""
    if key is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.uniform(key, (x.shape[0],) + (1,) * (x.ndim - 1)) < keep
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class SwinBlock(nnx.Module):
    """Pre-LN Swin block: x + attn(LN x) over (shifted) windows, then x + MLP(LN x) with exact GELU."""

    def __init__(self, dim: int, heads: int, window: int, config: HTSATConfig, *, rngs: nnx.Rngs):
        c = config
        self.norm1 = LayerNorm(dim, eps=c.eps, param_dtype=c.param_dtype)
        self.attn = WindowAttention(dim, heads, window, c, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=c.eps, param_dtype=c.param_dtype)
        hidden = int(dim * c.mlp_ratio)
        self.fc1 = Dense(dim, hidden, ("audio_embed", "audio_mlp"), use_bias=True, dtype=c.dtype,
                         param_dtype=c.param_dtype, rngs=rngs, init=trunc_normal(0.02))
        self.fc2 = Dense(hidden, dim, ("audio_mlp", "audio_embed"), use_bias=True, dtype=c.dtype,
                         param_dtype=c.param_dtype, rngs=rngs, init=trunc_normal(0.02))

    def __call__(self, x: jax.Array, *, resolution: int, window: int, shift: int, drop_rate: jax.Array | float = 0.0,
                 key: jax.Array | None = None) -> jax.Array:
        """x (N, resolution^2, C)."""
        n, _, dim = x.shape
        h = self.norm1(x).reshape(n, resolution, resolution, dim)
        if shift:
            h = jnp.roll(h, (-shift, -shift), axis=(1, 2))
        mask = shift_attention_mask(resolution, window, shift) if shift else None
        h = self.attn(partition_windows(h, window), relative_position_index(window), mask)
        h = merge_windows(h, window, resolution, resolution)
        if shift:
            h = jnp.roll(h, (shift, shift), axis=(1, 2))
        keys = jax.random.split(key) if key is not None else (None, None)
        x = x + drop_path(h.reshape(n, -1, dim).astype(x.dtype), drop_rate, keys[0])
        h = jax.nn.gelu(scan_lib.tag(self.fc1(self.norm2(x)), "mlp_in"), approximate=False)
        h = sharding.constrain(h, ("act_batch", "act_length", "act_mlp"))
        return x + drop_path(scan_lib.tag(self.fc2(h), "mlp_out").astype(x.dtype), drop_rate, keys[1])


class PatchMerging(nnx.Module):
    """2x2 neighbourhoods -> concat [(0,0), (1,0), (0,1), (1,1)] -> LN(4C) -> Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int, config: HTSATConfig, *, rngs: nnx.Rngs):
        c = config
        self.norm = LayerNorm(4 * dim, eps=c.eps, param_dtype=c.param_dtype)
        self.reduction = Dense(4 * dim, 2 * dim, ("audio_mlp", "audio_embed"), use_bias=False, dtype=c.dtype,
                               param_dtype=c.param_dtype, rngs=rngs, init=trunc_normal(0.02))

    def __call__(self, x: jax.Array, resolution: int) -> jax.Array:
        n, _, dim = x.shape
        x = x.reshape(n, resolution, resolution, dim)
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        return self.reduction(self.norm(x.reshape(n, -1, 4 * dim)))


class SwinStage(nnx.Module):
    """`depth` Swin blocks (stacked on a leading 'layers' axis; odd ones shifted) and an optional PatchMerging."""

    def __init__(self, stage: int, config: HTSATConfig, *, rngs: nnx.Rngs):
        c = config
        self.config, self.stage = c, stage
        dim, heads, window = c.embed_dim << stage, c.num_heads[stage], c.stage_window(stage)
        self.blocks = scan_lib.stack(lambda r: SwinBlock(dim, heads, window, c, rngs=r), c.depths[stage], rngs)
        self.downsample = PatchMerging(dim, c, rngs=rngs) if stage < len(c.depths) - 1 else None

    def __call__(self, x: jax.Array, *, drop_rates: np.ndarray | None = None, key: jax.Array | None = None) -> jax.Array:
        """x (N, L, C) -> stage output (after PatchMerging when there is one). `key` enables drop path."""
        c, s = self.config, self.stage
        depth = c.depths[s]
        geometry = dict(resolution=c.stage_resolution(s), window=c.stage_window(s))
        shifts = (0, c.stage_shift(s))
        rates = np.zeros(depth, np.float32) if drop_rates is None else np.asarray(drop_rates, np.float32)
        keys = jax.random.split(key, depth) if key is not None else None
        graphdef, state = nnx.split(self.blocks)

        def run_pair(pair_state, carry, pair_rates, pair_keys):
            for i, shift in enumerate(shifts):
                block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], pair_state))
                carry = block(carry, shift=shift, drop_rate=pair_rates[i],
                              key=None if pair_keys is None else pair_keys[i], **geometry)
            return carry

        pairs = jax.tree.map(lambda a: a.reshape(depth // 2, 2, *a.shape[1:]), state)
        pair_rates = jnp.asarray(rates.reshape(depth // 2, 2))
        pair_keys = None if keys is None else keys.reshape(depth // 2, 2, *keys.shape[1:])
        if c.scan_blocks:
            pair_module = nnx.merge(graphdef, pairs)

            def body(layer, carry, xs):
                layer_state = nnx.state(layer)
                return run_pair(layer_state, carry, *xs), None

            x, _ = scan_lib.scan(pair_module, body, x, (pair_rates, pair_keys), remat_policy=c.remat_policy)
        else:
            for p in range(depth // 2):
                x = run_pair(jax.tree.map(lambda a: a[p], pairs), x, pair_rates[p],
                             None if pair_keys is None else pair_keys[p])
        x = sharding.constrain(x, ("act_batch", "act_length", "act_embed"))
        if self.downsample is not None:
            x = self.downsample(x, c.stage_resolution(s))
        return x
