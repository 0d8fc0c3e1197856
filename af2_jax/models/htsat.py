"""HTSAT (AF-CLAP's audio branch): a Swin transformer over a folded log-mel image, as AF2 uses it.

Per 10 s window, mel (1001 frames, 64 bins) ->
  bn0         BatchNorm over the 64 mel bins
  image       torch bicubic resize of time 1001 -> 1024, cut into 4 chunks of 256 frames stacked on the row axis
              (row = 64 * chunk + bin, column = frame in chunk) -> 256 x 256
  patches     Conv(1 -> E, kernel 4, stride 4) = a 64 x 64 grid of tokens, LayerNorm
  4 stages    Swin blocks (8 x 8 windows, odd blocks cyclically shifted by 4 with a 0/-100 mask, relative position
              bias), PatchMerging after stages 0-2: grids 64/32/16/8, widths E/2E/4E/8E
  norm        final LayerNorm, then AF2's regrouping of the 8 x 8 grid into 64 tokens, n = 32 f + 8 a + w
              (f: mel half, a: time chunk, w: step in the chunk; grid row h = 2 a + f).
The classifier heads (`tscam_conv`, `head`) and the torchlibrosa STFT/mel bases are kept as `Buffer`s only so that
checkpoints round-trip exactly; the forward pass never reads them. The Swin relative-position index and the shift
masks are structural constants recomputed here (`relative_position_index`, `shift_attention_mask`), not stored.

`train=False` (eval semantics; what a frozen encoder uses): bn0 and the fusion BatchNorms use their running
statistics, no SpecAugment, no drop path, no fusion branch; `rngs` is ignored.

`clip_tokens(mel_fusion, longer)` is AF-CLAP's eval forward (never used by AF2): one (4, 1001, 64) `mel_fusion` per
clip, channel 0 the global mel, channels 1-3 three local crops of a clip longer than 10 s; clips flagged `longer`
go through the fusion branch (mel_conv2d over the 3 crops, AFF with running statistics), the others use channel 0
exactly as `__call__` does.

`train=True` follows the reference's training mode (HTSAT_Swin_Transformer.forward with enable_fusion, 'aff_2d'),
where one call of the reference model = the windows of one example:
  * bn0 normalises with the call's batch statistics (all its windows, padded ones included) and updates the running
    statistics (momentum 0.1, unbiased variance counted over the 4 identical `mel_fusion` channels the reference
    stacks, num_batches_tracked + 1);
  * SpecAugment zeroes, per window, 2 time stripes of width < 64 frames and 2 mel stripes of width < 8 bins;
  * as no AF2 window is ever longer than 10 s, the reference marks one random window per call 'longer': its patch
    tokens are fused with `mel_conv2d` (kernel 4 x 12, stride 4 x 12) over the 3 local copies of the same image
    through AFF (attentional feature fusion, BatchNorms in batch-statistics mode on the window duplicated, as the
    reference does for a batch of one; their running statistics update too);
  * drop path (stochastic depth) per window, rate rising linearly from 0 to `drop_path_rate` over all blocks.
Pass mel as (N, T, F) for one reference call, or (B, W, T, F) for B calls (one per example, as AF2's CLAP wrapper
does); eval results do not depend on the grouping. The reference draws its randomness from torch's global
generator; we draw the same distributions from `rngs.dropout()`, so training is deterministic given `rngs`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax import sharding
from af2_jax.audio.resize import bicubic_resize_axis
from af2_jax.models import scan as scan_lib
from af2_jax.models.layers import Dense, LayerNorm
from af2_jax.models.variables import Buffer


@dataclasses.dataclass(frozen=True)
class HTSATConfig:
    spec_size: int = 256
    patch_size: int = 4
    patch_stride: int = 4
    window_size: int = 8
    in_chans: int = 1
    mel_bins: int = 64
    embed_dim: int = 256
    depths: tuple[int, ...] = (2, 2, 12, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    num_classes: int = 527
    enable_fusion: bool = True  # AFF ('aff_2d') fusion branch: parameters always exist, used in training mode only
    eps: float = 1e-5  # LayerNorm and BatchNorm
    bn_momentum: float = 0.1  # torch convention: running = (1 - m) running + m batch
    n_fft: int = 1024  # shapes of the (unused) torchlibrosa STFT / mel buffers
    spec_augment_time: tuple[int, int] = (64, 2)  # (drop width, stripes) along frames
    spec_augment_freq: tuple[int, int] = (8, 2)  # (drop width, stripes) along mel bins
    remat_policy: str = "none"  # see af2_jax.models.scan.REMAT_POLICIES
    scan_blocks: bool = True  # scan each stage over (unshifted, shifted) block pairs: compiles ~1.5x faster than
    #                           unrolled (docs/PERFORMANCE.md)
    # > 0: window attention loops over groups of attention windows holding about this many scores, so that they stay
    # in cache between the matmuls and the softmax (CPU encoder forward 1.9-2.4x faster, docs/PERFORMANCE.md); 0: all
    # windows at once, what accelerators want; None: 2**18 on the CPU backend, else 0. The results are the same.
    attention_chunk_scores: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        if any(d % 2 for d in self.depths):
            raise ValueError(f"every stage depth must be even (unshifted/shifted block pairs), got {self.depths}")
        if self.patch_size != self.patch_stride:
            raise ValueError("only non-overlapping patches (patch_size == patch_stride) are supported")
        if self.in_chans != 1:
            raise ValueError("HTSAT's patch embedding reads the global mel only (in_chans=1)")
        if self.spec_size % self.mel_bins or self.spec_size % (self.patch_stride << (len(self.depths) - 1)):
            raise ValueError(f"spec_size {self.spec_size} must be a multiple of mel_bins and of the total stride")
        for s, heads in enumerate(self.num_heads):
            if (self.embed_dim << s) % heads:
                raise ValueError(f"stage {s} width {self.embed_dim << s} is not divisible by {heads} heads")
        if self.remat_policy not in scan_lib.REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat_policy!r}")

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def freq_ratio(self) -> int:
        return self.spec_size // self.mel_bins

    @property
    def target_frames(self) -> int:
        return self.spec_size * self.freq_ratio

    @property
    def grid_size(self) -> int:
        return self.spec_size // self.patch_stride

    @property
    def tokens_per_window(self) -> int:
        return (self.grid_size >> (len(self.depths) - 1)) ** 2

    def stage_resolution(self, stage: int) -> int:
        return self.grid_size >> stage

    def stage_window(self, stage: int) -> int:
        return min(self.window_size, self.stage_resolution(stage))

    def stage_shift(self, stage: int) -> int:
        """Cyclic shift of the odd blocks; none when one window covers the whole grid."""
        return 0 if self.stage_resolution(stage) <= self.window_size else self.window_size // 2

    def drop_path_rates(self) -> np.ndarray:
        return np.linspace(0.0, self.drop_path_rate, sum(self.depths), dtype=np.float32)


_PRESETS = {
    "large": dict(embed_dim=256, depths=(2, 2, 12, 2), num_heads=(4, 8, 16, 32), num_classes=527),
    # the golden fixture af2_tiny (config.json -> htsat.constructor_args)
    "tiny": dict(embed_dim=16, depths=(2, 2, 12, 2), num_heads=(4, 8, 16, 32), num_classes=10),
}


def htsat_preset(name: str, **overrides) -> HTSATConfig:
    if name not in _PRESETS:
        raise ValueError(f"unknown HTSAT preset {name!r}; choose one of {sorted(_PRESETS)}")
    return HTSATConfig(**{**_PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------------------------
# structural constants (also the values the converter checks against / writes for the reference's buffers)

def relative_position_index(window: int) -> np.ndarray:
    """(window^2, window^2) int64 index into the (2 window - 1)^2 relative position bias table."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype(np.int64)


def _partition_windows(x: np.ndarray | jax.Array, window: int):
    """(..., H, W, C) -> (..., nW, window^2, C), windows in raster order."""
    *lead, h, w, c = x.shape
    x = x.reshape(*lead, h // window, window, w // window, window, c)
    x = jnp.moveaxis(x, -4, -3) if isinstance(x, jax.Array) else np.moveaxis(x, -4, -3)
    return x.reshape(*lead, (h // window) * (w // window), window * window, c)


def _merge_windows(x: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """Inverse of `_partition_windows`."""
    *lead, _, _, c = x.shape
    x = x.reshape(*lead, h // window, w // window, window, window, c)
    return jnp.moveaxis(x, -3, -4).reshape(*lead, h, w, c)


def shift_attention_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """(nW, window^2, window^2) float32 mask of the shifted windows: 0 within a region, -100 across regions."""
    labels = np.zeros((resolution, resolution, 1), np.float32)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for hs in bounds:
        for ws in bounds:
            labels[hs, ws] = count
            count += 1
    windows = _partition_windows(labels, window)[..., 0]  # (nW, window^2)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, np.float32(-100.0), np.float32(0.0)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# small layers

def _trunc_normal(std: float):
    return nnx.initializers.truncated_normal(stddev=std, lower=-2.0 / std, upper=2.0 / std)


class Conv2d(nnx.Module):
    """Non-overlapping (stride = kernel) 2-D convolution on channels-last maps, kernel (kh, kw, in, out).

    A stride-equal-kernel convolution is a reshape into patches and one matmul: the same sums, and faster than a
    general convolution on every backend. Trailing rows/columns that do not fill a patch are dropped, as in torch.
    """

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], out_axis: str, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        fan_in = cin * kernel[0] * kernel[1]
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (*kernel, cin, cout), param_dtype) / np.sqrt(fan_in),
                                out_sharding=("conv", "conv", "conv", out_axis))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), out_sharding=(out_axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw, cin, cout = self.kernel.shape
        *lead, h, w, _ = x.shape
        gh, gw = h // kh, w // kw
        x = x[..., : gh * kh, : gw * kw, :].reshape(*lead, gh, kh, gw, kw, cin)
        x = jnp.moveaxis(x, -4, -3).reshape(*lead, gh, gw, kh * kw * cin)
        y = x.astype(self.dtype) @ self.kernel[...].reshape(kh * kw * cin, cout).astype(self.dtype)
        return y + self.bias[...].astype(self.dtype)


class BatchNorm(nnx.Module):
    """torch BatchNorm over the last (channel) axis: eval uses running statistics; training uses batch statistics
    and updates the running ones with the unbiased variance, as torch does (flax's BatchNorm differs in both)."""

    def __init__(self, channels: int, *, eps: float, momentum: float, param_dtype: Any):
        self.eps, self.momentum = eps, momentum
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), out_sharding=("norm",))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32), out_sharding=("norm",))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32), out_sharding=("norm",))
        # torch's counter; int32 here (jax without x64), int64 in torch files (the converter casts)
        self.num_batches_tracked = Buffer(jnp.zeros((), jnp.int32), out_sharding=())

    def _apply(self, x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        return (x.astype(jnp.float32) - mean) * inv + self.bias[...].astype(jnp.float32)

    def __call__(self, x: jax.Array, *, train: bool, call_axis: int | None = None, count_factor: int = 1) -> jax.Array:
        """Normalises x (fp32 out). In training, each index along `call_axis` is a separate reference call with its
        own batch statistics (reduced over every other non-channel axis); the running statistics are updated once
        per call, in order. `count_factor` scales the element count of the unbiased variance (duplicated inputs)."""
        if not train:
            return self._apply(x, self.mean[...], self.var[...])
        x32 = x.astype(jnp.float32)
        if call_axis is None:
            x32, call_axis = x32[None], 0
        x32 = jnp.moveaxis(x32, call_axis, 0)
        axes = tuple(range(1, x32.ndim - 1))
        mean = x32.mean(axes, keepdims=True)
        var = jnp.square(x32 - mean).mean(axes, keepdims=True)
        y = self._apply(x32, mean, var)
        count = count_factor * int(np.prod([x32.shape[a] for a in axes]))
        unbiased = var.reshape(x32.shape[0], -1) * (count / max(count - 1, 1))

        def update(running, stats):
            mean_r, var_r = running
            m, v = stats
            return ((1 - self.momentum) * mean_r + self.momentum * m, (1 - self.momentum) * var_r + self.momentum * v), None

        (new_mean, new_var), _ = jax.lax.scan(update, (self.mean[...], self.var[...]),
                                              (mean.reshape(x32.shape[0], -1), unbiased))
        self.mean.value, self.var.value = new_mean, new_var
        self.num_batches_tracked.value = self.num_batches_tracked[...] + x32.shape[0]
        y = jnp.moveaxis(y, 0, call_axis)
        return y[0] if x.ndim == y.ndim - 1 else y


def drop_path(x: jax.Array, rate: jax.Array | float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: zero a residual branch per sample (leading axis) with probability `rate`, else scale it."""
    if key is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.uniform(key, (x.shape[0],) + (1,) * (x.ndim - 1)) < keep
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def spec_augment(x: jax.Array, key: jax.Array, time: tuple[int, int], freq: tuple[int, int]) -> jax.Array:
    """torchlibrosa SpecAugmentation on (N, T, F): per sample, `stripes` times zero a band of width
    randint(0, width) starting at randint(0, size - width_drawn); first along time, then along frequency."""
    n, t_size, f_size = x.shape

    def stripes_mask(key, size, width, count):
        k_width, k_start = jax.random.split(key)
        widths = jax.random.randint(k_width, (n, count), 0, width)
        starts = jax.random.randint(k_start, (n, count), 0, size - widths)
        pos = jnp.arange(size)[None, None, :]
        dropped = (pos >= starts[..., None]) & (pos < (starts + widths)[..., None])
        return dropped.any(1)  # (N, size)

    k_time, k_freq = jax.random.split(key)
    drop_t = stripes_mask(k_time, t_size, *time)
    drop_f = stripes_mask(k_freq, f_size, *freq)
    dropped = drop_t[:, :, None] | drop_f[:, None, :]
    return jnp.where(dropped, jnp.zeros((), x.dtype), x)


# ----------------------------------------------------------------------------------------------------------------
# Swin blocks

class WindowAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, window: int, config: HTSATConfig, *, rngs: nnx.Rngs):
        c = config
        self.config, self.heads, self.dtype = c, heads, c.dtype
        self.qkv = Dense(dim, 3 * dim, ("audio_embed", "audio_heads"), use_bias=c.qkv_bias, dtype=c.dtype,
                         param_dtype=c.param_dtype, rngs=rngs, init=_trunc_normal(0.02))
        self.proj = Dense(dim, dim, ("audio_heads", "audio_embed"), use_bias=True, dtype=c.dtype,
                          param_dtype=c.param_dtype, rngs=rngs, init=_trunc_normal(0.02))
        self.relative_position_bias_table = nnx.Param(
            _trunc_normal(0.02)(rngs.params(), ((2 * window - 1) ** 2, heads), c.param_dtype),
            out_sharding=("bias_table", "audio_heads"))

    def __call__(self, x: jax.Array, index: np.ndarray, mask: np.ndarray | None) -> jax.Array:
        """x (N, nW, L, C) windows of L tokens; `mask` (nW, L, L) or None -> (N, nW, L, C)."""
        *lead, length, dim = x.shape
        head_dim = dim // self.heads
        qkv = self.qkv(x).reshape(*lead, length, 3, self.heads, head_dim)  # torch order: (3, heads, head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        bias = self.relative_position_bias_table[...].astype(jnp.float32)[index.reshape(-1)]
        bias = bias.reshape(length, length, self.heads).transpose(2, 0, 1)
        mask = None if mask is None else jnp.asarray(mask)
        windows = x.shape[-3]
        chunk = _attention_chunk(windows, int(np.prod(lead)) // windows * self.heads * length * length,
                                 self.config.attention_chunk_scores)
        if chunk == windows:
            out = _attend(q, k, v, bias, mask, self.dtype)
        else:
            out = _attend_in_groups(q, k, v, bias, mask, chunk, self.dtype)
        return self.proj(out.reshape(*lead, length, dim))


def _attend(q, k, v, bias, mask, dtype):
    """Softmax attention within windows: q, k, v (..., w, L, heads, head_dim), bias (heads, L, L), mask (w, L, L)
    or None -> (..., w, L, heads, head_dim)."""
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) + bias
    if mask is not None:
        scores = scores + mask[:, None]  # (w, 1, L, L) against (..., w, heads, L, L)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend_in_groups(q, k, v, bias, mask, chunk, dtype):
    """`_attend` as a loop over groups of `chunk` windows (axis -4 of q, k, v). The backward pass is `_attend`'s,
    unlooped: the loop's own transpose puts cross-device gradient sums inside a while loop, where XLA:CPU's
    concurrent thunk executor deadlocked two host devices (stage 2, session 7)."""
    windows = q.shape[-4]

    def group(a):  # (..., windows, L, h, d) -> (windows // chunk, ..., chunk, L, h, d)
        return jnp.moveaxis(a.reshape(*a.shape[:-4], windows // chunk, chunk, *a.shape[-3:]), -5, 0)

    masks = None if mask is None else mask.reshape(-1, chunk, *mask.shape[1:])
    out = jax.lax.map(lambda xs: _attend(*xs[:3], bias, xs[3], dtype), (group(q), group(k), group(v), masks))
    return jnp.moveaxis(out, 0, -5).reshape(q.shape)


def _attend_in_groups_forward(q, k, v, bias, mask, chunk, dtype):
    return _attend_in_groups(q, k, v, bias, mask, chunk, dtype), (q, k, v, bias, mask)


def _attend_in_groups_backward(chunk, dtype, residuals, grad):
    return jax.vjp(lambda *args: _attend(*args, dtype), *residuals)[1](grad)


_attend_in_groups.defvjp(_attend_in_groups_forward, _attend_in_groups_backward)


def _attention_chunk(windows: int, scores_per_window: int, budget: int | None) -> int:
    """The largest divisor of `windows` whose scores fit `budget` (at least 1); all of them when budget is 0;
    None is 2**18 on the CPU backend and 0 elsewhere."""
    if budget is None:
        budget = 2 ** 18 if jax.default_backend() == "cpu" else 0
    if budget <= 0:
        return windows
    fitting = max(1, budget // max(1, scores_per_window))
    return max(d for d in range(1, windows + 1) if windows % d == 0 and d <= fitting)


class SwinBlock(nnx.Module):
    """Pre-LN Swin block: x + attn(LN x) over (shifted) windows, then x + MLP(LN x) with exact GELU."""

    def __init__(self, dim: int, heads: int, window: int, config: HTSATConfig, *, rngs: nnx.Rngs):
        c = config
        self.norm1 = LayerNorm(dim, eps=c.eps, param_dtype=c.param_dtype)
        self.attn = WindowAttention(dim, heads, window, c, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=c.eps, param_dtype=c.param_dtype)
        hidden = int(dim * c.mlp_ratio)
        self.fc1 = Dense(dim, hidden, ("audio_embed", "audio_mlp"), use_bias=True, dtype=c.dtype,
                         param_dtype=c.param_dtype, rngs=rngs, init=_trunc_normal(0.02))
        self.fc2 = Dense(hidden, dim, ("audio_mlp", "audio_embed"), use_bias=True, dtype=c.dtype,
                         param_dtype=c.param_dtype, rngs=rngs, init=_trunc_normal(0.02))

    def __call__(self, x: jax.Array, *, resolution: int, window: int, shift: int, drop_rate: jax.Array | float = 0.0,
                 key: jax.Array | None = None) -> jax.Array:
        """x (N, resolution^2, C)."""
        n, _, dim = x.shape
        h = self.norm1(x).reshape(n, resolution, resolution, dim)
        if shift:
            h = jnp.roll(h, (-shift, -shift), axis=(1, 2))
        mask = shift_attention_mask(resolution, window, shift) if shift else None
        h = self.attn(_partition_windows(h, window), relative_position_index(window), mask)
        h = _merge_windows(h, window, resolution, resolution)
        if shift:
            h = jnp.roll(h, (shift, shift), axis=(1, 2))
        keys = jax.random.split(key) if key is not None else (None, None)
        x = x + drop_path(h.reshape(n, -1, dim).astype(x.dtype), drop_rate, keys[0])
        h = jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False)
        h = sharding.constrain(h, ("act_batch", "act_length", "act_mlp"))
        return x + drop_path(self.fc2(h).astype(x.dtype), drop_rate, keys[1])


class PatchMerging(nnx.Module):
    """2x2 neighbourhoods -> concat [(0,0), (1,0), (0,1), (1,1)] -> LN(4C) -> Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int, config: HTSATConfig, *, rngs: nnx.Rngs):
        c = config
        self.norm = LayerNorm(4 * dim, eps=c.eps, param_dtype=c.param_dtype)
        self.reduction = Dense(4 * dim, 2 * dim, ("audio_mlp", "audio_embed"), use_bias=False, dtype=c.dtype,
                               param_dtype=c.param_dtype, rngs=rngs, init=_trunc_normal(0.02))

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


# ----------------------------------------------------------------------------------------------------------------
# patch embedding with the AFF fusion branch

class AttentionalFeatureFusion(nnx.Module):
    """AFF ('aff_2d'): weights = sigmoid(local(x + r) + global(x + r)); out = 2 x w + 2 r (1 - w).

    local = 1x1 conv (C -> C/4), BN, ReLU, 1x1 conv (-> C), BN on every position; global = the same on the
    spatial mean. Maps are channels-last (..., H, W, C).
    """

    def __init__(self, channels: int, config: HTSATConfig, *, rngs: nnx.Rngs, reduction: int = 4):
        c = config
        inner = channels // reduction

        def conv(cin, cout, axis):
            return Conv2d(cin, cout, (1, 1), axis, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)

        def bn(ch):
            return BatchNorm(ch, eps=c.eps, momentum=c.bn_momentum, param_dtype=c.param_dtype)

        self.local_conv1, self.local_bn1 = conv(channels, inner, "audio_mlp"), bn(inner)
        self.local_conv2, self.local_bn2 = conv(inner, channels, "audio_embed"), bn(channels)
        self.global_conv1, self.global_bn1 = conv(channels, inner, "audio_mlp"), bn(inner)
        self.global_conv2, self.global_bn2 = conv(inner, channels, "audio_embed"), bn(channels)

    def __call__(self, x: jax.Array, residual: jax.Array, *, train: bool) -> jax.Array:
        """x, residual (G, H, W, C). In training each of the G maps is one reference call holding a single window,
        which the reference duplicates (a batch of 2) before its BatchNorms."""
        xa = (x + residual).astype(jnp.float32)
        if train:
            xa = jnp.stack([xa, xa], axis=1)  # (G, 2, H, W, C)
        norm = dict(train=train, call_axis=0 if train else None)
        local = self.local_bn2(self.local_conv2(jax.nn.relu(self.local_bn1(self.local_conv1(xa), **norm))), **norm)
        pooled = xa.mean(axis=(-3, -2), keepdims=True)
        glob = self.global_bn2(self.global_conv2(jax.nn.relu(self.global_bn1(self.global_conv1(pooled), **norm))),
                               **norm)
        weights = jax.nn.sigmoid(local + glob)
        if train:
            weights = weights[:, 0]
        out = 2 * x.astype(jnp.float32) * weights + 2 * residual.astype(jnp.float32) * (1 - weights)
        return out.astype(x.dtype)


class PatchEmbed(nnx.Module):
    def __init__(self, config: HTSATConfig, *, rngs: nnx.Rngs):
        c = config
        k = c.patch_size
        self.proj = Conv2d(c.in_chans, c.embed_dim, (k, k), "audio_embed", dtype=c.dtype, param_dtype=c.param_dtype,
                           rngs=rngs)
        self.norm = LayerNorm(c.embed_dim, eps=c.eps, param_dtype=c.param_dtype)
        if c.enable_fusion:
            self.mel_conv2d = Conv2d(c.in_chans, c.embed_dim, (k, 3 * k), "audio_embed", dtype=c.dtype,
                                     param_dtype=c.param_dtype, rngs=rngs)
            self.fusion_model = AttentionalFeatureFusion(c.embed_dim, c, rngs=rngs)
        else:
            self.mel_conv2d = self.fusion_model = None

    def local_tokens(self, image: jax.Array, copies: int = 3) -> jax.Array:
        """The fusion branch's local map for an image (G, H, W): the reference runs `mel_conv2d` on its 3 local mel
        copies (identical to the global one for <= 10 s windows), lays them side by side on the time axis and pads
        with zeros to the global grid width."""
        conv = self.mel_conv2d(image[..., None])  # (G, H/4, W/12, E)
        grid_w = image.shape[-1] // self.proj.kernel.shape[1]
        local = jnp.concatenate([conv] * copies, axis=-2)[..., :grid_w, :]
        pad = grid_w - local.shape[-2]
        return jnp.pad(local, [(0, 0)] * (local.ndim - 2) + [(0, pad), (0, 0)])

    def crop_tokens(self, crops: jax.Array) -> jax.Array:
        """The local map of distinct crops (G, n, H, W) (AF-CLAP's clips > 10 s): `mel_conv2d` per crop, the n maps
        side by side on the time axis in crop order, zero-padded to the global grid width -> (G, H/4, grid_w, E)."""
        conv = self.mel_conv2d(crops[..., None])  # (G, n, H/4, W/12, E)
        g, n, gh, cw, e = conv.shape
        grid_w = crops.shape[-1] // self.proj.kernel.shape[1]
        local = jnp.moveaxis(conv, 1, 2).reshape(g, gh, n * cw, e)[:, :, :grid_w]
        return jnp.pad(local, ((0, 0), (0, 0), (0, grid_w - local.shape[2]), (0, 0)))

    def fused(self, image: jax.Array, crops: jax.Array, longer: jax.Array) -> jax.Array:
        """AF-CLAP's eval-mode patch embedding: image (B, H, W) global, crops (B, 3, H, W), longer (B,) bool ->
        tokens (B, grid^2, E). AFF(global, local) with running statistics replaces the global map where `longer`
        (computed for every clip and selected, so shapes stay static; a clip's result does not depend on others)."""
        tokens = self.proj(image[..., None])  # (B, gh, gw, E)
        fused = self.fusion_model(tokens, self.crop_tokens(crops), train=False)
        tokens = jnp.where(jnp.asarray(longer, bool)[:, None, None, None], fused, tokens)
        b, gh, gw, e = tokens.shape
        return self.norm(tokens.reshape(b, gh * gw, e))

    def __call__(self, image: jax.Array, *, fuse_index: jax.Array | None = None) -> jax.Array:
        """image (B, W, H, W') -> tokens (B, W, grid^2, E). `fuse_index` (B,): window of each call that goes through
        the fusion branch (training mode only)."""
        tokens = self.proj(image[..., None])  # (B, W, gh, gw, E)
        if fuse_index is not None:
            rows = jnp.arange(image.shape[0])
            chosen = tokens[rows, fuse_index]
            fused = self.fusion_model(chosen, self.local_tokens(image[rows, fuse_index]), train=True)
            tokens = tokens.at[rows, fuse_index].set(fused)
        *lead, gh, gw, e = tokens.shape
        return self.norm(tokens.reshape(*lead, gh * gw, e))


# ----------------------------------------------------------------------------------------------------------------

class HTSAT(nnx.Module):
    """HTSAT-large (AF-CLAP audio branch) as AF2 uses it: mel windows -> (windows, 64, num_features)."""

    def __init__(self, config: HTSATConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.bn0 = BatchNorm(c.mel_bins, eps=c.eps, momentum=c.bn_momentum, param_dtype=c.param_dtype)
        self.patch_embed = PatchEmbed(c, rngs=rngs)
        self.stages = nnx.List([SwinStage(s, c, rngs=rngs) for s in range(len(c.depths))])
        self.norm = LayerNorm(c.num_features, eps=c.eps, param_dtype=c.param_dtype)
        # Kept only for exact checkpoint round trips (AF2 never reads them).
        freq_rows = c.spec_size // c.patch_stride >> (len(c.depths) - 1)
        bins = c.n_fft // 2 + 1
        self.tscam_conv = nnx.Dict(
            kernel=Buffer(jnp.zeros((freq_rows // c.freq_ratio, 3, c.num_features, c.num_classes), c.param_dtype)),
            bias=Buffer(jnp.zeros((c.num_classes,), c.param_dtype)))
        self.head = nnx.Dict(kernel=Buffer(jnp.zeros((c.num_classes, c.num_classes), c.param_dtype)),
                             bias=Buffer(jnp.zeros((c.num_classes,), c.param_dtype)))
        # torchlibrosa's STFT (conv1d weights, torch layout (bins, 1, n_fft)) and mel filterbank (bins, mel_bins)
        self.stft_real = Buffer(jnp.zeros((bins, 1, c.n_fft), jnp.float32))
        self.stft_imag = Buffer(jnp.zeros((bins, 1, c.n_fft), jnp.float32))
        self.mel_filterbank = Buffer(jnp.zeros((bins, c.mel_bins), jnp.float32))

    # -- pieces, public so that tests can compare each stage with the reference ------------------------------------
    def to_image(self, mel: jax.Array, *, train: bool = False, key: jax.Array | None = None) -> jax.Array:
        """mel (B, W, T, F) -> bn0 (+ SpecAugment in training) -> time resize to 1024 -> fold -> (B, W, 256, 256)."""
        c = self.config
        b, w, frames, bins = mel.shape
        x = self.bn0(mel, train=train, call_axis=0 if train else None,
                     count_factor=4 if c.enable_fusion else 1)  # the reference's mel_fusion holds 4 copies
        if train:
            x = spec_augment(x.reshape(b * w, frames, bins), key, c.spec_augment_time,
                             c.spec_augment_freq).reshape(b, w, frames, bins)
        x = bicubic_resize_axis(x, c.target_frames, axis=2)  # fp32
        chunk = c.target_frames // c.freq_ratio
        x = x.reshape(b, w, c.freq_ratio, chunk, bins)  # (.., chunk a, frame t, bin f)
        return jnp.swapaxes(x, -1, -2).reshape(b, w, c.freq_ratio * bins, chunk)  # row = 64 a + f, column = t

    def regroup(self, x: jax.Array) -> jax.Array:
        """(..., grid^2, C) raster tokens of the last stage -> AF2 order n = 32 f + 8 a + w (row h = 2 a + f)."""
        c = self.config
        side = int(round(np.sqrt(x.shape[-2])))
        half = side // c.freq_ratio
        x = x.reshape(*x.shape[:-2], c.freq_ratio, half, side, x.shape[-1])  # (a, f, w)
        return jnp.swapaxes(x, -4, -3).reshape(*x.shape[:-4], side * side, x.shape[-1])

    # -----------------------------------------------------------------------------------------------------------
    def __call__(self, mel: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        """mel (N, T<=1024, 64) log-mel windows -> (N, 64, num_features); (B, W, T, 64) -> (B, W, 64, C), where each
        of the B groups is one reference call in training mode (see the module docstring)."""
        c = self.config
        if mel.ndim not in (3, 4):
            raise ValueError(f"mel must be (windows, frames, bins) or (batch, windows, frames, bins), got {mel.shape}")
        if mel.shape[-1] != c.mel_bins or mel.shape[-2] > c.target_frames or mel.shape[-2] < 2:
            raise ValueError(f"mel windows must be (frames <= {c.target_frames}, {c.mel_bins} bins), "
                             f"got {mel.shape[-2:]}")
        single_call = mel.ndim == 3
        x = mel[None] if single_call else mel
        keys = [None] * 4
        if train:
            if rngs is None:
                raise ValueError("HTSAT in training mode needs rngs (SpecAugment, fusion window, drop path)")
            keys = list(jax.random.split(rngs.dropout(), 4))
        b, w = x.shape[:2]
        image = self.to_image(x, train=train, key=keys[0])
        fuse_index = None
        if train and c.enable_fusion:
            fuse_index = jax.random.randint(keys[1], (b,), 0, w)
        h = self.patch_embed(image.astype(c.dtype), fuse_index=fuse_index).reshape(b * w, -1, c.embed_dim)
        h = sharding.constrain(h, ("act_batch", "act_length", "act_embed"))
        h = self.encode_patches(h, key=keys[2] if train else None)
        h = h.reshape(b, w, c.tokens_per_window, c.num_features)
        return h[0] if single_call else h

    def encode_patches(self, h: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """Patch tokens (N, grid^2, E) -> Swin stages -> final LayerNorm -> AF2 order (N, 64, C); `key` enables
        drop path."""
        c = self.config
        rates = c.drop_path_rates()
        stage_keys = jax.random.split(key, len(self.stages)) if key is not None else [None] * len(self.stages)
        start = 0
        for s, stage in enumerate(self.stages):
            depth = c.depths[s]
            h = stage(h, drop_rates=rates[start:start + depth], key=stage_keys[s])
            start += depth
        return self.regroup(self.norm(h))

    def clip_tokens(self, mel_fusion: jax.Array, longer: jax.Array) -> jax.Array:
        """AF-CLAP's eval forward: mel_fusion (B, 4, T<=1024, 64) (channel 0 the global mel, 1-3 the local crops),
        longer (B,) bool -> final-norm tokens (B, 64, C) in the order `__call__` returns. AF2 never calls this."""
        c = self.config
        if not c.enable_fusion:
            raise ValueError("clip_tokens needs the fusion branch (HTSATConfig.enable_fusion=True)")
        if mel_fusion.ndim != 4 or mel_fusion.shape[1] != 4 or mel_fusion.shape[-1] != c.mel_bins \
                or not 2 <= mel_fusion.shape[-2] <= c.target_frames:
            raise ValueError(f"mel_fusion must be (batch, 4, frames <= {c.target_frames}, {c.mel_bins}), "
                             f"got {mel_fusion.shape}")
        if jnp.shape(longer) != mel_fusion.shape[:1]:
            raise ValueError(f"longer must be ({mel_fusion.shape[0]},), got {jnp.shape(longer)}")
        image = self.to_image(mel_fusion).astype(c.dtype)  # bn0 (running statistics) per channel, (B, 4, S, S)
        h = self.patch_embed.fused(image[:, 0], image[:, 1:], longer)
        h = sharding.constrain(h, ("act_batch", "act_length", "act_embed"))
        return self.encode_patches(h)

    def clipwise_output(self, tokens: jax.Array) -> jax.Array:
        """The AudioSet head HTSAT computes beside its embedding (unused by AF2 and AF-CLAP; for parity checks):
        tokens (N, 64, C) in AF2 order = a (freq rows, time) map; `tscam_conv` (kernel rows x 3, time padding 1),
        mean over time, sigmoid -> (N, num_classes)."""
        kernel, bias = self.tscam_conv["kernel"][...], self.tscam_conv["bias"][...]
        rows, width = kernel.shape[0], kernel.shape[1]
        n, length, ch = tokens.shape
        x = tokens.astype(jnp.float32).reshape(n, rows, length // rows, ch)
        x = jnp.pad(x, ((0, 0), (0, 0), (width // 2, width // 2), (0, 0)))
        steps = length // rows
        taps = jnp.stack([x[:, :, j:j + steps] for j in range(width)], axis=2)  # (N, rows, width, T, C)
        logits = jnp.einsum("nrjtc,rjck->ntk", taps, kernel.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST) + bias.astype(jnp.float32)
        return jax.nn.sigmoid(logits.mean(axis=1))
