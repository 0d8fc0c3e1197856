"""What `launch/infer.py` and `launch/chat.py` are asked: (audio file(s), question) items from the command line or a
manifest, and each file turned into AF2 windows (the reference reads at most max_windows x 10 s from the start;
longer audio is cropped with a warning). Errors name the file or manifest line, so one bad item never stops the
others.

Also the inference side of several audios per prompt (docs/ICL.md): prompts whose text is already in AF2's format
(few-shot, chat) answered in batches (`answer_prompts`), retrieved few-shot prompts (`fewshot_request`), and one
row's answer streamed token by token (`TokenStreamer`) through the model's own jitted `prefill` / `decode_step`."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings

import numpy as np

from af2_jax.audio.windows import WINDOW_SAMPLES, SAMPLE_RATE, make_windows

AUDIO_KEYS = ("audio", "audio_path", "path", "name", "file", "wav")
PROMPT_KEYS = ("prompt", "question", "instruction", "query")


class RequestError(ValueError):
    """A manifest or item that cannot be used; the message names where and why."""


@dataclasses.dataclass
class Item:
    id: str
    audio: str | list[str]  # a list: several clips, the prompt naming one <audio> per clip
    prompt: str

    @property
    def audios(self) -> list[str]:
        return list(self.audio) if isinstance(self.audio, list) else [self.audio]


def _pick(row: dict, keys: tuple[str, ...]):
    return next((row[k] for k in keys if isinstance(row.get(k), str) and row[k].strip()), None)


def read_items(path) -> list[Item]:
    """A JSONL file (one object per line), a JSON list of objects, or an AF2 manifest ({"data": {...}}); each object
    has an audio path (audio/path/name/...) and a question (prompt/question/...). Relative audio paths are relative
    to the manifest's folder (AF2 manifests: dataset_path/split_path)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise RequestError(f"{path}: manifest not found")
    text = path.read_text(encoding="utf-8")
    root = path.parent
    rows: list[tuple[str, object]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise RequestError(f"{path}: line {number}: invalid JSON ({e.msg})") from None
    else:
        try:
            content = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        if isinstance(content, dict) and "data" in content:
            root = pathlib.Path(content.get("dataset_path") or root) / (content.get("split_path") or "")
            data = content["data"]
            rows = [(f"entry {k}", v) for k, v in (data.items() if isinstance(data, dict) else enumerate(data))]
        elif isinstance(content, list):
            rows = [(f"entry {i}", v) for i, v in enumerate(content)]
        else:
            raise RequestError(f"{path}: expected a JSON list of objects, JSONL, or an AF2 manifest with 'data'")
    items = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise RequestError(f"{path}: {where}: expected an object, got {type(row).__name__}")
        audio, prompt = _pick(row, AUDIO_KEYS), _pick(row, PROMPT_KEYS)
        listed = next((row[k] for k in AUDIO_KEYS if isinstance(row.get(k), list)), None)
        if audio is None and listed is not None:  # several clips: one <audio> per clip in the prompt
            if not listed or not all(isinstance(a, str) and a.strip() for a in listed):
                raise RequestError(f"{path}: {where}: an audio list must hold non-empty paths, got {listed!r}")
            audio = listed
        if audio is None or prompt is None:
            raise RequestError(f"{path}: {where}: needs an audio path ({'/'.join(AUDIO_KEYS)}) and a question "
                               f"({'/'.join(PROMPT_KEYS)})")
        row_id = row.get("id", where.split()[-1])
        paths = [_resolve(a, root) for a in (audio if isinstance(audio, list) else [audio])]
        items.append(Item(str(row_id), paths if isinstance(audio, list) else paths[0], prompt))
    return items


def _resolve(audio: str, root: pathlib.Path) -> str:
    audio_path = pathlib.Path(os.path.expanduser(audio))
    return str(audio_path if audio_path.is_absolute() else root / audio_path)


def load_windows(path: str, max_windows: int) -> np.ndarray:
    """The file as (n <= max_windows, 160000) windows; audio past max_windows x 10 s is cropped with a warning.

    Raises af2_jax.audio.io.AudioError naming the file when it cannot be read."""
    import soundfile

    from af2_jax.audio.io import AudioError, load_audio

    limit = max_windows * WINDOW_SAMPLES / SAMPLE_RATE
    try:
        seconds = soundfile.info(path).duration
    except Exception:  # load_audio below reports unreadable files by name
        seconds = None
    if seconds is not None and seconds > limit:
        warnings.warn(f"{path}: audio is {seconds:.1f} s; only the first {limit:.0f} s ({max_windows} windows) are "
                      f"used (raise --max-windows to hear more)", stacklevel=2)
    wave = load_audio(path, duration=limit)  # the reference's read: at most `limit` seconds from the start
    if wave.size == 0:
        raise AudioError(path, "no audio samples")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already warned above
        return make_windows(wave, max_windows, name=path)


# ---------------------------------------------------------------------------------------------------------------
# several audios per prompt: few-shot and chat prompts, retrieval, streaming


def entry_windows(entry: dict, max_windows: int) -> np.ndarray:
    """An index entry's (or any single-audio record's) clip as windows, read as the training pipeline reads it
    (its start and duration respected)."""
    from af2_jax.data.examples import load_waveform

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_windows(load_waveform(entry, max_windows), max_windows, name=str(entry.get("audio")))


def load_answering_model(checkpoint, tokenizer_dir=None, max_windows: int | None = None, options=None):
    """(model, tokenizer, max_windows) for the answering commands: the model directory (or workdir) resolved and
    loaded as the `serving.ServingOptions` say (dtype, int8, mesh), its tokenizer checked against the model's
    special-token ids, `max_windows` defaulting to the model's limit and refused above it."""
    from af2_jax import pretrained
    from af2_jax.inference import serving
    from af2_jax.inference.generate import check_tokenizer

    model_dir = pretrained.resolve(checkpoint)
    tokenizer = pretrained.load_tokenizer(model_dir, tokenizer_dir)
    model = serving.load_serving_model(model_dir, options or serving.ServingOptions())
    check_tokenizer(model.config, tokenizer)
    limit = model.config.max_windows
    max_windows = max_windows or limit
    if max_windows > limit:
        raise ValueError(f"--max-windows {max_windows} exceeds what this model takes ({limit} windows = "
                         f"{limit * 10} s)")
    return model, tokenizer, max_windows


def text_prompt_ids(tokenizer, text: str, *, audios: int, max_prompt_tokens: int = 512) -> list[int]:
    """Token ids of a prompt already in AF2's format (special tokens written out, e.g. `format_icl_prompt` or
    `format_chat_prompt`), ending in `<SEP>`; raises ValueError when it is too long or its `<audio>` count is not
    `audios`."""
    from af2_jax.tokenizer import PromptTooLongError

    ids = tokenizer.encode(text)
    if len(ids) > max_prompt_tokens:
        raise PromptTooLongError(f"the prompt is {len(ids)} tokens long, the limit is {max_prompt_tokens}; shorten "
                                 f"it (or use fewer examples / turns)")
    found = ids.count(tokenizer.audio_id)
    if found != audios:
        raise ValueError(f"the prompt holds {found} <audio> tokens for {audios} clip(s)")
    return ids


def answer_prompts(model, tokenizer, audios: list[list[np.ndarray]], prompts: list[list[int]], sampling, *,
                   key=None) -> list[str]:
    """Answers to a batch of (clips, prompt ids) rows: one clip each gives the single-audio layout (as
    `generate.answer_batch`), else the multi-audio one (`pad_audios`)."""
    from af2_jax.audio.windows import pad_batch
    from af2_jax.inference.generate import answer_text, check_tokenizer, generate_tokens, left_pad, pad_audios

    check_tokenizer(model.config, tokenizer)
    if any(len(a) > 1 for a in audios):
        audio, audio_mask = pad_audios(audios)
    else:
        audio, audio_mask = pad_batch([a[0] for a in audios])
    ids, mask = left_pad(prompts, tokenizer.pad_id)
    tokens = generate_tokens(model, audio, audio_mask, ids, mask, sampling, key=key)
    return [answer_text(tokenizer, row) for row in tokens]


def fewshot_request(index, embedder, query_windows: np.ndarray, query_wave: np.ndarray, prompt: str, k: int, *,
                    max_windows: int, seed: int, query_number: int, query_file: str | None = None,
                    selection: str = "similar") -> tuple[list[np.ndarray], str, list[dict]]:
    """A query's retrieved (or random) k-shot prompt: (clips: the examples' windows then the query's, the prompt
    text in AF1's ICL format with AF2's tokens, the example entries)."""
    from af2_jax.retrieval import fewshot
    from af2_jax.tokenizer import format_icl_prompt

    if selection == "similar":
        vector = embedder.embed([query_wave], batch_size=1)
        rows = fewshot.retrieve_shots(index, vector, k, seed=seed, query_files=[query_file],
                                      first_query=query_number)[0]
    elif selection == "random":
        rows = fewshot.random_shots(index.entries, k, fewshot.query_rng(seed, query_number), query_file=query_file)
    else:
        raise ValueError(f"selection must be 'similar' or 'random', got {selection!r}")
    shots = [index.entries[r] for r in rows]
    for shot in shots:
        if not isinstance(shot.get("prompt"), str) or not isinstance(shot.get("answer"), str):
            raise ValueError(f"index entry {shot.get('id')} has no prompt and answer to show as an example")
    text = format_icl_prompt([(s["prompt"], s["answer"]) for s in shots], prompt, kind=selection)
    clips = [entry_windows(s, max_windows) for s in shots] + [query_windows]
    return clips, text, shots


class TokenStreamer:
    """One prompt's generated tokens, one at a time: the model's jitted `prefill`, then a Python loop over its jitted
    `decode_step` (what `generate.generate_tokens` runs inside one while_loop). The same key and sampling give the
    same tokens as `generate_tokens` (each token drawn with fold_in(key, step))."""

    def __init__(self, model):
        import jax
        from flax import nnx

        from af2_jax.inference.sampling import next_token
        from af2_jax.models.af2 import init_cache

        self.model = model
        self._graphdef, self._state = nnx.split(model)

        def prefill(graphdef, state, audio_kv, media_mask, ids, mask, max_len):
            model = nnx.merge(graphdef, state)
            return model.prefill(audio_kv, media_mask, ids, mask, init_cache(model.config, ids.shape[0], max_len))

        def step(graphdef, state, token, audio_kv, media_mask, cache):
            return nnx.merge(graphdef, state).decode_step(token, audio_kv, media_mask, cache)

        self._prefill = jax.jit(prefill, static_argnums=(0, 6))
        self._step = jax.jit(step, static_argnums=0)
        self._pick = jax.jit(lambda logits, key, index, sampling: next_token(
            logits, jax.random.fold_in(key, index), sampling), static_argnums=3)

    def stream(self, audio, audio_mask, input_ids, attention_mask, sampling, *, key=None, eos_id=None):
        """Yields token ids (of row 0 of a one-row batch) until eos (yielded) or `sampling.max_new_tokens`."""
        import dataclasses as dc

        import jax
        import jax.numpy as jnp

        from af2_jax.inference.generate import encode_audio_kv

        config = self.model.config
        eos_id = config.eos_token_id if eos_id is None else eos_id
        key = jax.random.key(sampling.seed) if key is None else key
        sampling = dc.replace(sampling, seed=0)  # hashable static argument; the key carries the seed
        audio_kv, media_mask = encode_audio_kv(self.model, audio, audio_mask)
        ids = jnp.asarray(input_ids, jnp.int32)
        logits, cache = self._prefill(self._graphdef, self._state, audio_kv, media_mask, ids,
                                      jnp.asarray(attention_mask, jnp.int32), ids.shape[1] + sampling.max_new_tokens)
        for index in range(sampling.max_new_tokens):
            token = self._pick(logits, key, index, sampling)
            value = int(token[0])
            yield value
            if value == eos_id:
                return
            logits, cache = self._step(self._graphdef, self._state, token, audio_kv, media_mask, cache)


class TextStream:
    """Turns streamed token ids into text pieces: the decoded answer grows, each call returns what is new (a
    piece ending inside a multi-byte character waits for the next token)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._shown = ""

    def push(self, token: int) -> str:
        from af2_jax.tokenizer import END_OF_CHUNK_TOKEN, EOS_TOKEN, PAD_TOKEN, SEP_TOKEN

        self._ids.append(int(token))
        text = self._tokenizer.decode(self._ids).rsplit(SEP_TOKEN, 1)[-1]  # as extract_answer: after the last <SEP>
        for special in (EOS_TOKEN, PAD_TOKEN, END_OF_CHUNK_TOKEN):
            text = text.replace(special, "")
        text = text.lstrip()
        if text.endswith("\ufffd") or not text.startswith(self._shown):
            return ""
        piece, self._shown = text[len(self._shown):], text
        return piece

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    @property
    def shown(self) -> str:
        return self._shown
