"""TEMPORARY stand-in for af2_jax.models.af2.AF2Model (same call signature and top-level parameter layout: htsat with
BatchStats, audio_transformer, stacked xattn, llm/embed_tokens, stacked llm/layers, llm/norm), used only until the
real model's audio encoder lands."""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax.models import scan


@dataclasses.dataclass(frozen=True)
class StandInConfig:
    d_audio: int = 16
    d: int = 32
    vocab: int = 300
    layers: int = 2
    tokens_per_window: int = 8


def _p(key, shape, axes, scale=0.2):
    return nnx.Param(scale * jax.random.normal(key, shape), out_sharding=axes)


class StandInHTSAT(nnx.Module):
    def __init__(self, c, rngs):
        self.proj = _p(rngs.params(), (16, c.d_audio), ("conv", "audio_embed"))
        self.bn = nnx.BatchNorm(c.d_audio, rngs=rngs)

    def __call__(self, audio, train):
        b, w, n = audio.shape
        x = audio.reshape(b, w, 8, n // 8)[..., :16] @ self.proj[...]
        x = self.bn(x.reshape(b * w * 8, -1), use_running_average=not train)
        return x.reshape(b, w * 8, -1)


class StandInXAttn(nnx.Module):
    def __init__(self, c, rngs):
        self.q = _p(rngs.params(), (c.d, c.d), ("embed", "heads"))
        self.kv = _p(rngs.params(), (c.d_audio, c.d), ("audio_embed", "heads"))
        self.gate = nnx.Param(jnp.full((1,), 0.5))


class StandInLayer(nnx.Module):
    def __init__(self, c, rngs):
        self.w1 = _p(rngs.params(), (c.d, 4 * c.d), ("embed", "mlp"))
        self.w2 = _p(rngs.params(), (4 * c.d, c.d), ("mlp", "embed"))


class StandInLLM(nnx.Module):
    def __init__(self, c, rngs):
        self.embed_tokens = nnx.Embed(c.vocab, c.d, rngs=rngs)
        self.layers = scan.stack(lambda r: StandInLayer(c, r), c.layers, rngs)
        self.norm = nnx.Param(jnp.ones((c.d,)), out_sharding=("norm",))


class StandInAF2(nnx.Module):
    def __init__(self, config: StandInConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.htsat = StandInHTSAT(c, rngs)
        self.audio_transformer = nnx.Linear(c.d_audio, c.d_audio, rngs=rngs)
        self.xattn = scan.stack(lambda r: StandInXAttn(c, r), c.layers, rngs)
        self.llm = StandInLLM(c, rngs)

    def __call__(self, audio, audio_mask, input_ids, attention_mask, *, train_htsat=False, deterministic=True,
                 rngs=None):
        media = self.audio_transformer(self.htsat(audio, train_htsat))
        media_mask = jnp.repeat(audio_mask, self.config.tokens_per_window, axis=1)
        h = self.llm.embed_tokens(input_ids)

        def body(layers, h, _):
            xa, layer = layers
            scores = jnp.einsum("btd,bsd->bts", h @ xa.q[...], media @ xa.kv[...])
            scores = jnp.where(media_mask[:, None, :] > 0, scores, -1e9)
            h = h + jnp.tanh(xa.gate[...]) * jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores), media @ xa.kv[...])
            h = h + jax.nn.gelu(h @ layer.w1[...]) @ layer.w2[...]
            return h, None
        h, _ = scan.scan((self.xattn, self.llm.layers), body, h)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * self.llm.norm[...]
        return (h @ self.llm.embed_tokens.embedding[...].T).astype(jnp.float32)
