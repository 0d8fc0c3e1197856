"""Audio Flamingo 2 assembled: waveform windows -> log-mel -> HTSAT -> audio transformer -> gated cross-attention
before every Qwen2 decoder layer -> logits.

The decoder runs as ONE `jax.lax.scan` over superblocks (cross-attention block i, then decoder layer i), so compile
time does not grow with depth; `AF2Config.scan_unroll` unrolls it and `remat_policy` picks what the backward pass
recomputes. Audio never enters the LLM's sequence: text attends to it only through the cross-attention blocks.

Entry points:
- `__call__(audio, audio_mask, input_ids, attention_mask)` -> fp32 logits, for training and scoring;
- `encode_audio` -> (media, media_mask); `audio_kv(media)` -> every layer's audio keys/values, computed once per
  prompt; `prefill` / `decode_step` run text chunks against those cached audio keys/values and a text KV cache.

Several audios per example (docs/MULTI_AUDIO.md): audio (B, A, W, 160000) with audio_mask (B, A, W) instead of
(B, W, ...). Each audio is encoded on its own; media are slot-major (B, A*W*64, C) and the media mask keeps the
slots, (B, A, W*64). With `AF2Config.media_location_mask` the text after the i-th `<audio>` token sees audios
0..i (AF1's rule, text before the first `<audio>` sees audio 0); the cache counts each row's `<audio>` tokens so a
decode step sees every audio up to it (AF1's decode step sees only the first audio: a bug we do not copy).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax import sharding
from af2_jax.audio.mel import log_mel
from af2_jax.models import audio_encoder, qwen2, scan
from af2_jax.models.audio_transformer import AudioTransformer, AudioTransformerConfig, audio_transformer_preset
from af2_jax.models.htsat import HTSAT, HTSATConfig, htsat_preset
from af2_jax.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM, attention_inputs, qwen2_preset
from af2_jax.models.xattn import GatedCrossAttentionBlock, XAttnConfig, visible_slots

# (k, v), each (layers, B, S, heads, dim_head): every cross-attention layer's keys/values of one batch's audio.
AudioKV = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class AF2Config:
    htsat: HTSATConfig
    audio_transformer: AudioTransformerConfig
    llm: Qwen2Config
    xattn: XAttnConfig
    max_windows: int = 30  # 10 s windows per example (30 = 5 min)
    # af2_jax.models.scan.REMAT_POLICIES, for the superblock scan (cross-attention + decoder layer); HTSAT's and the
    # audio transformer's are htsat.remat_policy and audio_transformer.remat_policy
    remat_policy: str = "none"
    scan_unroll: bool = False
    # Not in AF2: add a sinusoidal embedding of each audio token's time to HTSAT's output (audio_encoder.py).
    # Parameter-free, so weights convert either way; off reproduces the reference exactly.
    audio_time_embedding: bool = False
    # Not in AF2's release: AF1's media-location mask for several audios per prompt (docs/MULTI_AUDIO.md); only
    # a multi-audio media mask (B, A>1, N) is affected, so off or on, single-audio results are the same.
    media_location_mask: bool = False
    # special tokens (af2_reference.md section 5; the tiny fixture uses its own small vocabulary)
    audio_token_id: int = 151665
    eoc_token_id: int = 151666
    pad_token_id: int = 151667
    sep_token_id: int = 151668
    eos_token_id: int = 151643

    def __post_init__(self):
        if self.remat_policy not in scan.REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose one of {sorted(scan.REMAT_POLICIES)}")
        if self.llm.remat_policy != "none" or self.llm.scan_unroll:
            # AF2 runs the decoder as its own scan over superblocks: the Qwen2 scan's switches are never read
            raise ValueError("inside AF2 set AF2Config.remat_policy / scan_unroll (the superblock scan), not "
                             f"llm.remat_policy={self.llm.remat_policy!r} / llm.scan_unroll={self.llm.scan_unroll}")
        if self.xattn.dim != self.llm.hidden_size:
            raise ValueError(f"xattn.dim {self.xattn.dim} != llm.hidden_size {self.llm.hidden_size}")
        if self.max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {self.max_windows}")
        for name in ("audio_token_id", "eoc_token_id", "pad_token_id", "sep_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.llm.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary ({self.llm.vocab_size})")


# name -> (htsat preset, audio transformer preset, qwen2 preset, LLM overrides, token ids, max_windows)
_REAL_IDS = dict(audio_token_id=151665, eoc_token_id=151666, pad_token_id=151667, sep_token_id=151668,
                 eos_token_id=151643)
_TINY_IDS = dict(audio_token_id=296, eoc_token_id=297, pad_token_id=298, sep_token_id=299, eos_token_id=295)
AF2_PRESETS: dict[str, dict] = {
    # the golden fixture's shapes (../shared/fixtures/af2_tiny); max_windows 12 as in its reference config
    "tiny": dict(htsat="tiny", audio_transformer="tiny", llm="tiny", llm_overrides=dict(max_position_embeddings=512),
                 ids=_TINY_IDS, max_windows=12),
    "0.5b": dict(htsat="large", audio_transformer="large", llm="qwen2.5-0.5b", llm_overrides=dict(vocab_size=151669),
                 ids=_REAL_IDS, max_windows=30),
    "1.5b": dict(htsat="large", audio_transformer="large", llm="qwen2.5-1.5b", llm_overrides=dict(vocab_size=151669),
                 ids=_REAL_IDS, max_windows=30),
    "3b": dict(htsat="large", audio_transformer="large", llm="qwen2.5-3b", llm_overrides=dict(vocab_size=151669),
               ids=_REAL_IDS, max_windows=30),
}


def af2_preset(name: str, **overrides) -> AF2Config:
    """A preset's config ('tiny', '0.5b', '1.5b', '3b'); keyword overrides replace AF2Config fields, e.g.
    `af2_preset('3b', remat_policy='full', max_windows=12)`. `dtype=`/`param_dtype=` set every sub-config's."""
    if name not in AF2_PRESETS:
        raise KeyError(f"unknown AF2 preset {name!r}; choose one of {sorted(AF2_PRESETS)}")
    spec = AF2_PRESETS[name]
    dtypes = {k: overrides.pop(k) for k in ("dtype", "param_dtype") if k in overrides}
    llm = qwen2_preset(spec["llm"], **spec["llm_overrides"], **dtypes)
    at = audio_transformer_preset(spec["audio_transformer"], **dtypes)
    fields = dict(
        htsat=htsat_preset(spec["htsat"], **dtypes),
        audio_transformer=at,
        llm=llm,
        xattn=XAttnConfig(dim=llm.hidden_size, dim_audio=at.d_model, **dtypes),
        max_windows=spec["max_windows"],
        **spec["ids"],
    )
    fields.update(overrides)
    return AF2Config(**fields)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AF2Cache(KVCache):
    """The text KV cache plus `audio_seen` (B,) int32: each row's `<audio>` tokens among the cached text, so that
    a later chunk (a decode step) knows which audio slots it may see."""

    audio_seen: jax.Array


def init_cache(config: AF2Config, batch: int, max_len: int, dtype=None) -> AF2Cache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
    text = qwen2.init_cache(config.llm, batch, max_len, dtype)
    return AF2Cache(**{f.name: getattr(text, f.name) for f in dataclasses.fields(KVCache)},
                    audio_seen=jnp.zeros((batch,), jnp.int32))


def _as_af2_cache(cache: KVCache) -> AF2Cache:
    """A plain (empty) text cache gets a zero `<audio>` count; an AF2Cache is returned as is."""
    if isinstance(cache, AF2Cache):
        return cache
    return AF2Cache(**{f.name: getattr(cache, f.name) for f in dataclasses.fields(KVCache)},
                    audio_seen=jnp.zeros(cache.valid.shape[:1], jnp.int32))


def media_layout(media_mask: jax.Array) -> tuple[jax.Array, int]:
    """(B, S) or slotted (B, A, N) media mask -> (flat (B, S) mask, number of audio slots A)."""
    if media_mask.ndim == 2:
        return media_mask, 1
    if media_mask.ndim == 3:
        return media_mask.reshape(media_mask.shape[0], -1), media_mask.shape[1]
    raise ValueError(f"media_mask must be (B, S) or (B, audios, tokens per audio), got {media_mask.shape}")


def text_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions of real tokens count real tokens before them (transformers' cumsum(mask) - 1, right or left
    padding); padding slots keep their index, so a right-padded row reads 0..T-1 exactly as the reference's
    forward (which ignores the mask for positions)."""
    mask = attention_mask.astype(bool)
    counted = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    return jnp.where(mask, counted, jnp.arange(mask.shape[-1], dtype=jnp.int32))


class AF2Model(nnx.Module):
    def __init__(self, config: AF2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.htsat = HTSAT(config.htsat, rngs=rngs)
        self.audio_transformer = AudioTransformer(config.audio_transformer, rngs=rngs)
        self.xattn = scan.stack(lambda r: GatedCrossAttentionBlock(config.xattn, rngs=r), config.llm.num_layers, rngs)
        self.llm = Qwen2ForCausalLM(config.llm, rngs=rngs)

    # ---- audio side -------------------------------------------------------------------------------------------

    def encode_audio(self, audio: jax.Array, audio_mask: jax.Array, *, train_htsat: bool = False,
                     deterministic: bool = True, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        """audio (B, W, 160000) windows, audio_mask (B, W) -> media (B, W*64, C), media_mask (B, W*64); or several
        audios per row, audio (B, A, W, 160000), audio_mask (B, A, W) -> media (B, A*W*64, C) slot-major,
        media_mask (B, A, W*64)."""
        if audio.ndim not in (3, 4) or audio_mask.shape != audio.shape[:-1]:
            raise ValueError(f"encode_audio: expected audio (B, W, 160000) and audio_mask (B, W), or (B, A, W, "
                             f"160000) and (B, A, W), got {audio.shape} and {audio_mask.shape}")
        mel = log_mel(audio.astype(jnp.float32))
        encode = audio_encoder.encode_audio if audio.ndim == 3 else audio_encoder.encode_audios
        return encode(self.htsat, self.audio_transformer, mel, audio_mask,
                      add_time_embedding=self.config.audio_time_embedding,
                      train_htsat=train_htsat, deterministic=deterministic, rngs=rngs)

    def audio_kv(self, media: jax.Array) -> AudioKV:
        """Every cross-attention layer's audio keys/values, (layers, B, S, heads, dim_head) each."""
        def body(block, carry, _):
            return carry, block.audio_kv(media)

        _, kv = scan.scan(self.xattn, body, None, None, unroll=self.config.scan_unroll)
        return tuple(sharding.constrain(x, qwen2.CACHE_AXES) for x in kv)

    # ---- text side --------------------------------------------------------------------------------------------

    def decode(self, h: jax.Array, media_mask: jax.Array, *, media: jax.Array | None = None,
               audio_kv: AudioKV | None = None, positions: jax.Array, mask: jax.Array,
               cache: KVCache | None = None, visible: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Hidden states through every superblock (cross-attention i, decoder layer i) as one scan.

        Give either `media` (audio keys/values computed inside each layer: cheapest memory for training, where the
        remat policy may recompute them) or `audio_kv` (precomputed once per prompt, for generation). `cache`
        must already mark this chunk's slots valid (see `qwen2.attention_inputs`). `visible` (B, T): the audio
        slots each position sees (media-location mask; needs a slotted media_mask (B, A, N)), None: all.
        """
        if (media is None) == (audio_kv is None):
            raise ValueError("decode: pass exactly one of media and audio_kv")
        flat_mask, slots = media_layout(media_mask)
        slot_size = flat_mask.shape[-1] // slots
        if visible is not None and slots == 1:
            visible = None  # one slot: the mask allows everything, keep the plain path bit for bit

        def body(layers, h, xs):
            block, decoder_layer = layers
            layer_audio_kv, layer_text_kv = xs
            if layer_audio_kv is None:
                layer_audio_kv = block.audio_kv(media)
            h = block(h, layer_audio_kv, flat_mask, visible, slot_size)
            layer_cache = None if layer_text_kv is None else dataclasses.replace(
                cache, k=layer_text_kv[0], v=layer_text_kv[1])
            h, layer_cache = decoder_layer(h, positions=positions, mask=mask, cache=layer_cache)
            return h, None if layer_cache is None else (layer_cache.k, layer_cache.v)

        xs = (audio_kv, None if cache is None else (cache.k, cache.v))
        h, text_kv = scan.scan((self.xattn, self.llm.layers), body, h, xs,
                               remat_policy=self.config.remat_policy, unroll=self.config.scan_unroll)
        if cache is not None:
            cache = dataclasses.replace(cache, k=text_kv[0], v=text_kv[1], index=cache.index + h.shape[1])
        return h, cache

    def media_visibility(self, media_mask: jax.Array, input_ids: jax.Array,
                         seen: jax.Array | None = None) -> jax.Array | None:
        """(B, T) audio slots visible to each text position when the media-location mask applies (config on and a
        multi-slot media mask), else None. `seen` (B,): `<audio>` tokens of the text before this chunk."""
        if not self.config.media_location_mask or media_layout(media_mask)[1] == 1:
            return None
        return visible_slots(input_ids, self.config.audio_token_id, seen)

    def text_logits(self, media_mask: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
                    media: jax.Array | None = None, audio_kv: AudioKV | None = None,
                    cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Logits (B, T, V) fp32 of a text chunk given the encoded audio; with a cache the chunk is appended to it
        (prefill of a left-padded prompt, or one decode step with attention_mask ones)."""
        if cache is None:
            positions, mask = text_positions(attention_mask), attention_inputs(attention_mask)[1]
            visible = self.media_visibility(media_mask, input_ids)
        else:
            cache = _as_af2_cache(cache)
            visible = self.media_visibility(media_mask, input_ids, cache.audio_seen)
            positions, mask, key_valid = attention_inputs(attention_mask, cache)
            seen = cache.audio_seen + jnp.sum((input_ids == self.config.audio_token_id).astype(jnp.int32), axis=-1)
            cache = dataclasses.replace(cache, valid=key_valid, audio_seen=seen)
        h, cache = self.decode(self.llm.embed(input_ids), media_mask, media=media, audio_kv=audio_kv,
                               positions=positions, mask=mask, cache=cache, visible=visible)
        return self.llm.logits(h), cache

    def prefill(self, audio_kv: AudioKV, media_mask: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                cache: KVCache) -> tuple[jax.Array, KVCache]:
        """A left-padded prompt batch into an empty cache (`init_cache`; a plain text KVCache is taken as having
        seen no `<audio>`) -> (logits of the last position (B, V), AF2Cache)."""
        logits, cache = self.text_logits(media_mask, input_ids, attention_mask, audio_kv=audio_kv, cache=cache)
        return logits[:, -1], cache

    def decode_step(self, tokens: jax.Array, audio_kv: AudioKV, media_mask: jax.Array,
                    cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One new token per row (B,) -> (next-token logits (B, V), cache). The token sees the audio slots of
        every `<audio>` token cached before it or equal to it (the mask of the last position, not AF1's first)."""
        if not isinstance(cache, AF2Cache) and self.media_visibility(media_mask, tokens[:, None]) is not None:
            raise ValueError("decode_step with the media-location mask needs the AF2Cache that prefill returns "
                             "(it counts the prompt's <audio> tokens)")
        ids = tokens[:, None]
        logits, cache = self.text_logits(media_mask, ids, jnp.ones(ids.shape, bool), audio_kv=audio_kv, cache=cache)
        return logits[:, 0], cache

    def __call__(self, audio: jax.Array, audio_mask: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
                 train_htsat: bool = False, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        """audio (B, W, 160000), audio_mask (B, W) (or several audios per row, (B, A, W, 160000) and (B, A, W)),
        input_ids / attention_mask (B, T) -> logits (B, T, V) fp32."""
        media, media_mask = self.encode_audio(audio, audio_mask, train_htsat=train_htsat,
                                              deterministic=deterministic, rngs=rngs)
        return self.text_logits(media_mask, input_ids, attention_mask, media=media)[0]
