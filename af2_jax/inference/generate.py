"""Batched AF2 generation: encode the audio once, compute every layer's audio keys/values once, prefill the
left-padded prompts into a text KV cache, then decode inside one jitted `jax.lax.while_loop` (no host round trip
per token) until every row has emitted `<|endoftext|>` or `max_new_tokens` is reached.

Batches may mix audio lengths (missing windows are zeros with mask 0) and prompt lengths (LEFT padding); a row's
tokens do not depend on the other rows of its batch. A model whose weights are sharded over a mesh
(`serving.load_serving_model` with fsdp/tensor) generates on that mesh: weights stay split, the rows are split over
the mesh's data axes where they divide, the caches over batch and heads. Otherwise a batch's rows are split over
the process's devices (data parallel, the model copied onto each) whenever they divide evenly: on a CPU split into
host devices, each core encodes its share of the audio.

Several audios per request (docs/MULTI_AUDIO.md): audio (B, A, W, 160000) with mask (B, A, W), both the audio slots
and each audio's windows padded, and a prompt with one `<audio>` per audio. With the model's media-location mask on,
every generated token sees all audios of its row (its cache counts the prompt's `<audio>` tokens).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from af2_jax import sharding
from af2_jax.audio.windows import pad_audios, pad_batch  # noqa: F401  (pad_audios: part of this module's API)
from af2_jax.inference.serving import model_mesh
from af2_jax.inference.sampling import SamplingConfig, next_token
from af2_jax.models.af2 import init_cache
from af2_jax.tokenizer import AUDIO_TOKEN, SEP_TOKEN, AF2Tokenizer, encode_prompt, extract_answer

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this, so few distinct shapes get compiled


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode(graphdef, state, audio, audio_mask):
    """Audio -> every layer's audio keys/values and the audio-token mask (compiled per audio shape only)."""
    model = nnx.merge(graphdef, state)
    media, media_mask = model.encode_audio(audio, audio_mask)
    return model.audio_kv(media), media_mask


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_id", "pad_id"))
def _decode(graphdef, state, audio_kv, media_mask, input_ids, attention_mask, key, *, sampling: SamplingConfig,
            eos_id: int, pad_id: int):
    """Prefill + the whole token loop on device; audio keys/values are reused by every step."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    steps = sampling.max_new_tokens
    cache = init_cache(model.config, batch, prompt_len + steps)
    logits, cache = model.prefill(audio_kv, media_mask, input_ids, attention_mask, cache)

    def keep_going(carry):
        step, _, finished, _, _ = carry
        return (step < steps) & ~jnp.all(finished)

    def one_token(carry):
        step, tokens, finished, logits, cache = carry
        token = next_token(logits, jax.random.fold_in(key, step), sampling)
        token = jnp.where(finished, pad_id, token)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        finished = finished | (token == eos_id)
        logits, cache = model.decode_step(token, audio_kv, media_mask, cache)
        return step + 1, tokens, finished, logits, cache

    tokens = jnp.full((batch, steps), pad_id, jnp.int32)
    carry = (jnp.zeros((), jnp.int32), tokens, jnp.zeros((batch,), bool), logits, cache)
    _, tokens, _, _, _ = jax.lax.while_loop(keep_going, one_token, carry)
    return tokens


def encode_audio_kv(model: nnx.Module, audio, audio_mask):
    """(audio keys/values of every layer, audio-token mask) for a batch of windows, on device."""
    graphdef, state = nnx.split(model)
    return _encode(graphdef, state, jnp.asarray(audio, jnp.float32), jnp.asarray(audio_mask, jnp.float32))


def data_parallel_mesh(rows: int) -> Mesh | None:
    """A (data=n, fsdp=1, tensor=1) mesh of this process's first n devices, n the most that split `rows` evenly;
    None when that is one device."""
    devices = jax.local_devices()
    n = math.gcd(rows, len(devices))
    return sharding.make_mesh(n, 1, 1, devices=devices[:n]) if n > 1 else None


def generate_tokens(model: nnx.Module, audio, audio_mask, input_ids, attention_mask, sampling: SamplingConfig, *,
                    key: jax.Array | None = None, eos_id: int | None = None, data_parallel: bool = True
                    ) -> np.ndarray:
    """audio (B, W, 160000), audio_mask (B, W) (or several audios per row: (B, A, W, 160000), (B, A, W), see
    `pad_audios`), left-padded input_ids / attention_mask (B, T) -> generated ids (B, max_new_tokens); each row
    ends at its first eos (`<|endoftext|>` unless `eos_id` says otherwise; included) and is padded with the pad id.
    A model sharded over a mesh (`model_mesh`) runs there; else with `data_parallel` the rows are split over
    `data_parallel_mesh(B)` and the model's weights are replicated onto its devices (once: later calls find them
    there)."""
    config = model.config
    eos_id = config.eos_token_id if eos_id is None else eos_id
    if key is None:
        key = jax.random.key(sampling.seed)
    attention_mask = np.asarray(attention_mask)
    if attention_mask.shape[1] and not attention_mask[:, -1].all():
        raise ValueError("generate_tokens: prompts must be LEFT-padded (every row's last token must be real)")
    inputs = (np.asarray(audio, np.float32), np.asarray(audio_mask, np.float32), np.asarray(input_ids, np.int32),
              attention_mask.astype(np.int32))
    mesh = model_mesh(model)
    if mesh is None and data_parallel:
        mesh = data_parallel_mesh(len(attention_mask))
        if mesh is not None:
            nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, PartitionSpec())))
    if mesh is None:
        return _generate(model, *map(jnp.asarray, inputs), key, sampling, eos_id)
    shape = dict(mesh.shape)
    inputs = [jax.device_put(x, NamedSharding(mesh, sharding.logical_to_spec(
        ("act_batch",) + (None,) * (x.ndim - 1), x.shape, shape))) for x in inputs]
    with jax.set_mesh(mesh):
        return _generate(model, *inputs, key, sampling, eos_id)


def _generate(model, audio, audio_mask, input_ids, attention_mask, key, sampling, eos_id) -> np.ndarray:
    audio_kv, media_mask = encode_audio_kv(model, audio, audio_mask)
    graphdef, state = nnx.split(model)
    tokens = _decode(graphdef, state, audio_kv, media_mask, input_ids, attention_mask, key,
                     sampling=dataclasses.replace(sampling, seed=0), eos_id=int(eos_id),
                     pad_id=model.config.pad_token_id)
    return np.asarray(tokens)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = PROMPT_BUCKET
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids, attention_mask) (B, T), right-aligned, T rounded up to `multiple`."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("left_pad: every prompt needs at least one token")
    width = -(-max(len(p) for p in prompts) // multiple) * multiple
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def answer_text(tokenizer: AF2Tokenizer, generated: Sequence[int]) -> str:
    """Generated ids -> the answer: up to the first `<|endoftext|>`, without `<|endofchunk|>`/pad, trimmed."""
    ids = list(generated)
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    return extract_answer(tokenizer.decode(ids))


@dataclasses.dataclass
class Request:
    """One question about one clip: its windows (n, 160000) from `audio.windows.make_windows`, and the prompt.

    Several clips: `windows` is a list of such arrays, one per audio, and the prompt holds one `<audio>` per clip
    where that clip belongs (e.g. "<audio>a dog. <audio>which one barks?"); one clip may omit its `<audio>`."""

    windows: np.ndarray | Sequence[np.ndarray]
    prompt: str

    @property
    def audios(self) -> list[np.ndarray]:
        """The request's clips as a list of (n, 160000) windows arrays."""
        return [self.windows] if isinstance(self.windows, np.ndarray) else list(self.windows)

    @property
    def multi_audio(self) -> bool:
        return not isinstance(self.windows, np.ndarray)


def request_prompt_ids(tokenizer: AF2Tokenizer, request: Request, max_prompt_tokens: int = 512) -> list[int]:
    """The prompt's token ids: `<audio>{prompt}<SEP>` lowercased for a single clip (the reference format, also for
    a list of one clip whose prompt names no `<audio>`); else `{prompt}<SEP>` lowercased, which must hold exactly
    one `<audio>` per clip after truncation."""
    audios = len(request.audios)
    text = request.prompt.lower().strip()
    if not request.multi_audio or (audios == 1 and AUDIO_TOKEN not in text):
        return encode_prompt(tokenizer, request.prompt, max_prompt_tokens)
    ids = tokenizer.encode(text + SEP_TOKEN)[:max_prompt_tokens]
    found = ids.count(tokenizer.audio_id)
    if found != audios:
        raise ValueError(f"a request with {audios} audio(s) needs one {AUDIO_TOKEN} per audio in its prompt "
                         f"(within {max_prompt_tokens} tokens), found {found}: {request.prompt[:80]!r}")
    return ids


def check_tokenizer(config, tokenizer: AF2Tokenizer) -> None:
    """Raises ValueError when the tokenizer's special ids are not the ones the model was trained with."""
    pairs = {"audio": (tokenizer.audio_id, config.audio_token_id),
             "endofchunk": (tokenizer.eoc_id, config.eoc_token_id),
             "pad": (tokenizer.pad_id, config.pad_token_id), "sep": (tokenizer.sep_id, config.sep_token_id),
             "eos": (tokenizer.eos_id, config.eos_token_id)}
    wrong = [f"{name}: tokenizer {got}, model {want}" for name, (got, want) in pairs.items() if got != want]
    if wrong or len(tokenizer) > config.llm.vocab_size:
        raise ValueError(f"tokenizer and checkpoint do not belong together ({'; '.join(wrong) or ''} "
                         f"tokenizer size {len(tokenizer)}, model vocabulary {config.llm.vocab_size})")


def answer_batch(model: nnx.Module, tokenizer: AF2Tokenizer, requests: Sequence[Request],
                 sampling: SamplingConfig, *, key: jax.Array | None = None, max_prompt_tokens: int = 512
                 ) -> list[str]:
    """Answers to a batch of requests in the reference prompt format (`<audio>{prompt}<SEP>`, lowercased); a
    batch with a several-audio request uses the multi-audio layout (`pad_audios`, `request_prompt_ids`)."""
    check_tokenizer(model.config, tokenizer)
    if any(r.multi_audio for r in requests):
        audio, audio_mask = pad_audios([r.audios for r in requests])
    else:
        audio, audio_mask = pad_batch([r.windows for r in requests])
    prompts = [request_prompt_ids(tokenizer, r, max_prompt_tokens) for r in requests]
    ids, mask = left_pad(prompts, tokenizer.pad_id)
    tokens = generate_tokens(model, audio, audio_mask, ids, mask, sampling, key=key)
    return [answer_text(tokenizer, row) for row in tokens]
