"""HTSAT's patch embedding: a 4 x 4 patch convolution of the folded mel image, and the AFF fusion branch that
AF-CLAP uses for clips longer than 10 s (and the reference's training mode for one window per call)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax.models.htsat_config import HTSATConfig
from af2_jax.models.layers import LayerNorm
from af2_jax.models.torch_layers import BatchNorm, Conv2d


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

