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
masks are structural constants recomputed (`window_attention.py`), not stored.

Its parts, one file each: `htsat_config.py`, `torch_layers.py` (Conv2d, BatchNorm), `spec_augment.py`,
`patch_embed.py` (with the AFF fusion branch), `window_attention.py`, `swin.py` (blocks and stages).

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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax import sharding
from af2_jax.audio.resize import bicubic_resize_axis
from af2_jax.models.htsat_config import HTSATConfig, htsat_preset
from af2_jax.models.patch_embed import PatchEmbed
from af2_jax.models.spec_augment import spec_augment
from af2_jax.models.swin import SwinStage
from af2_jax.models.layers import LayerNorm
from af2_jax.models.torch_layers import BatchNorm
from af2_jax.models.variables import Buffer

__all__ = ["HTSAT", "HTSATConfig", "htsat_preset"]


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
