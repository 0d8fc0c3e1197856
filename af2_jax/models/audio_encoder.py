"""AF2's audio encoder: HTSAT per 10 s window, windows concatenated in order, then the audio transformer.

Mirrors `Flamingo._encode_audio_x`: (B, W, 64, C) -> (B, W*64, C) window-major, the window mask repeated 64x.
HTSAT sees each example's windows as one reference call (padded windows included), which only matters in
training mode (per-example batch statistics and fusion window, see af2_jax.models.htsat).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax.models.audio_transformer import AudioTransformer
from af2_jax.models.htsat import HTSAT


def encode_audio(htsat: HTSAT, audio_transformer: AudioTransformer, mel: jax.Array, window_mask: jax.Array, *,
                 train_htsat: bool = False, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """mel (B, W, 1001, 64) log-mel windows, window_mask (B, W) (nonzero = real window) ->
    (audio tokens (B, W*64, C), token mask (B, W*64) as float32).

    `train_htsat` runs HTSAT in training mode (batch statistics, SpecAugment, fusion, drop path); `deterministic=False`
    enables the audio transformer's dropout. Either needs `rngs`.
    """
    if mel.ndim != 4 or window_mask.shape != mel.shape[:2]:
        raise ValueError(f"expected mel (batch, windows, frames, bins) and window_mask (batch, windows), got "
                         f"{mel.shape} and {window_mask.shape}")
    if (train_htsat or not deterministic) and rngs is None:
        raise ValueError("training-mode audio encoding needs rngs")
    b, w = mel.shape[:2]
    tokens = htsat(mel, train=train_htsat, rngs=rngs)  # (B, W, 64, C)
    per_window = tokens.shape[2]
    tokens = tokens.reshape(b, w * per_window, tokens.shape[-1])
    token_mask = jnp.repeat(window_mask.astype(jnp.float32), per_window, axis=1)
    return audio_transformer(tokens, token_mask, deterministic=deterministic, rngs=rngs), token_mask
