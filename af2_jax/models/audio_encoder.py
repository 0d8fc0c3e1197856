"""AF2's audio encoder: HTSAT per 10 s window, windows concatenated in order, then the audio transformer.

Mirrors `Flamingo._encode_audio_x`: (B, W, 64, C) -> (B, W*64, C) window-major, the window mask repeated 64x.
Optionally (`add_time_embedding`, not in AF2) a sinusoidal embedding of each token's time is added before the audio
transformer. AF2's audio tokens carry no absolute time: HTSAT has no absolute position embedding and the audio
transformer's RoPE is relative, so "which came first" or "in which minute" must be inferred from relative offsets.
Later models of the family add explicit time embeddings (RoTE in Music Flamingo / AF3). The tiny curriculum uses it
(docs/RESULTS.md measures the difference); the real presets keep the reference architecture.

HTSAT sees each example's windows as one reference call (padded windows included), which only matters in
training mode (per-example batch statistics and fusion window, see af2_jax.models.htsat).

`encode_audios` takes several audios per example (docs/MULTI_AUDIO.md): each is encoded as a single-audio example
would be, and the results are concatenated slot-major.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax.models.audio_transformer import AudioTransformer
from af2_jax.models.htsat import HTSAT


TIME_EMBEDDING_BASE = 10000.0


def time_embedding(num_windows: int, dim: int, tokens_per_window: int = 64) -> jax.Array:
    """(num_windows * tokens_per_window, dim) sinusoids of each token's time step across all windows. HTSAT's
    tokens of a window are 2 mel halves x S time steps (token k = f*S + t, S = tokens_per_window / 2, ~0.31 s per
    step), so token k of window w has time w*S + k % S. Half the dims are sin(time * f_i), half cos(time * f_i),
    with f_i = BASE^(-2i/dim)."""
    steps = tokens_per_window // 2
    k = jnp.arange(num_windows * tokens_per_window)
    time = (k // tokens_per_window) * steps + k % steps
    freqs = TIME_EMBEDDING_BASE ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = time[:, None].astype(jnp.float32) * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)[:, :dim]


def encode_audio(htsat: HTSAT, audio_transformer: AudioTransformer, mel: jax.Array, window_mask: jax.Array, *,
                 add_time_embedding: bool = False, train_htsat: bool = False, deterministic: bool = True,
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
    if add_time_embedding:
        tokens = tokens + time_embedding(w, tokens.shape[-1], per_window).astype(tokens.dtype)
    token_mask = jnp.repeat(window_mask.astype(jnp.float32), per_window, axis=1)
    return audio_transformer(tokens, token_mask, deterministic=deterministic, rngs=rngs), token_mask


def encode_audios(htsat: HTSAT, audio_transformer: AudioTransformer, mel: jax.Array, window_mask: jax.Array, *,
                  add_time_embedding: bool = False, train_htsat: bool = False, deterministic: bool = True,
                  rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """Several audios per example: mel (B, A, W, 1001, 64), window_mask (B, A, W) -> (audio tokens
    (B, A*W*64, C) slot-major, token mask (B, A, W*64) float32).

    Each audio is encoded exactly as a single-audio example is (`encode_audio`): HTSAT per window, then the audio
    transformer over that audio's own windows (its RoPE positions start at 0 per audio, padded windows are masked
    keys). In training mode each audio is one HTSAT reference call, an empty slot included (it then enters the
    BatchNorm running statistics like padded windows do)."""
    if mel.ndim != 5 or window_mask.shape != mel.shape[:3]:
        raise ValueError(f"expected mel (batch, audios, windows, frames, bins) and window_mask (batch, audios, "
                         f"windows), got {mel.shape} and {window_mask.shape}")
    b, a, w = mel.shape[:3]
    tokens, token_mask = encode_audio(htsat, audio_transformer, mel.reshape(b * a, *mel.shape[2:]),
                                      window_mask.reshape(b * a, w), add_time_embedding=add_time_embedding,
                                      train_htsat=train_htsat, deterministic=deterministic, rngs=rngs)
    per_audio = tokens.shape[1]
    return tokens.reshape(b, a * per_audio, tokens.shape[-1]), token_mask.reshape(b, a, per_audio)
