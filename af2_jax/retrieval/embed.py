"""Clip embeddings for retrieval: an AF-CLAP model's audio embedding (AF1 used LAION-CLAP's; ours is the model AF2's
HTSAT comes from) or, for an AF2 model, its HTSAT tokens mean-pooled (the audio AF2 itself reads, before its audio
transformer). Either way the first 10 s of a clip (AF1: `duration=10`), read by the training pipeline's loader
(16 kHz, peak-normalised, int16 round trip), and unit vectors out (so inner product = cosine).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Sequence

import numpy as np

KINDS = {"afclap": "afclap", "af2": "af2-htsat"}  # model kind -> the index's embedding name
SECONDS = 10.0


@functools.cache
def _jitted(kind: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from af2_jax.audio.mel import log_mel

    if kind == "afclap":
        return jax.jit(lambda graphdef, state, mel, longer: nnx.merge(graphdef, state).audio_embedding(mel, longer),
                       static_argnums=0)

    def htsat_pooled(graphdef, state, windows):
        model = nnx.merge(graphdef, state)
        tokens = model.htsat(log_mel(windows[:, None].astype(jnp.float32)), train=False)  # (B, 1, 64, C)
        pooled = tokens[:, 0].astype(jnp.float32).mean(axis=1)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    return jax.jit(htsat_pooled, static_argnums=0)


@dataclasses.dataclass
class Embedder:
    """A loaded model and how it embeds 16 kHz waveforms (`embed`)."""

    kind: str  # 'afclap' | 'af2'
    model: Any
    model_dir: str

    @property
    def embedding(self) -> str:
        return KINDS[self.kind]

    def features(self, wave: np.ndarray) -> tuple[np.ndarray, ...]:
        """One prepared waveform's model input (its first 10 s)."""
        from af2_jax.audio.windows import WINDOW_SAMPLES, make_windows

        wave = np.asarray(wave, np.float32)[:WINDOW_SAMPLES]
        if wave.size == 0:
            raise ValueError("an empty clip cannot be embedded")
        if self.kind == "afclap":
            from af2_jax.audio.clap_features import clap_audio_features

            # the loader already did the int16 round trip; a second one could move samples by one step
            mel, longer = clap_audio_features(wave, quantize=False)  # <= 10 s: repeat-padded
            return mel, np.asarray(longer)
        return (make_windows(wave, 1)[0],)

    def embed(self, waves: Iterable[np.ndarray], *, batch_size: int = 16, progress=None) -> np.ndarray:
        """Waveforms -> (n, d) float32 unit vectors. Batches have a fixed size (the tail repeats its last clip),
        so one program is compiled; `progress(n)` is called after each batch with its clip count."""
        from flax import nnx

        graphdef, state = nnx.split(self.model)
        out, pending = [], []

        def flush():
            real = len(pending)
            arrays = [np.stack(parts) for parts in zip(*pending)]
            arrays = [np.concatenate([a, np.repeat(a[-1:], batch_size - real, axis=0)]) for a in arrays]
            out.append(np.asarray(_jitted(self.kind)(graphdef, state, *arrays), np.float32)[:real])
            pending.clear()
            if progress is not None:
                progress(real)

        for wave in waves:
            pending.append(self.features(wave))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_embedder(model_dir) -> Embedder:
    """The embedder of an AF-CLAP or AF2 model directory (or a training workdir: `pretrained.resolve`)."""
    from af2_jax import pretrained

    directory = pretrained.resolve(model_dir)
    kind, _ = pretrained.read_config(directory)
    if kind not in KINDS:
        raise ValueError(f"{directory}: a {kind!r} model cannot embed audio for retrieval (give an AF-CLAP or AF2 "
                         f"model)")
    return Embedder(kind, pretrained.load_model(directory), str(directory))


def clip_waveform(record: dict) -> np.ndarray:
    """A single-audio record's first 10 s, as the training pipeline reads it."""
    from af2_jax.data.examples import load_waveform

    if isinstance(record.get("audio"), list) or "dialogue" in record:
        raise ValueError(f"{record.get('id')}: an index entry must be a single-audio record")
    return load_waveform(dict(record, duration=min(float(record.get("duration") or SECONDS), SECONDS)), 1)


def entry_of(record: dict) -> dict:
    """What the index keeps of a record (JSON-serialisable)."""
    keep = ("id", "audio", "start", "duration", "prompt", "answer", "dataset", "skill")
    return {k: record[k] for k in keep if k in record and not isinstance(record[k], np.ndarray)}


def embed_records(embedder: Embedder, records: Sequence[dict], *, batch_size: int = 16, progress=None
                  ) -> np.ndarray:
    return embedder.embed((clip_waveform(r) for r in records), batch_size=batch_size, progress=progress)
