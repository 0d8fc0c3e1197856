"""AF2's tokenizer and prompt format: special tokens, prompt text, training text and its loss mask.

The reference (af2_reference.md section 5) adds `<audio>`, `<|endofchunk|>`, `<|PAD_TOKEN|>` and `<SEP>` to the
Qwen2.5 tokenizer (after its base vocabulary, ids 151665..151668), writes no BOS and no chat template, and lowercases
prompt and answer. Used by data, inference and the converter, so it depends only on `tokenizers` (never grain).
"""
from __future__ import annotations

import json
import pathlib
from typing import Iterable, Sequence

import tokenizers

AUDIO_TOKEN = "<audio>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<|PAD_TOKEN|>"
SEP_TOKEN = "<SEP>"
EOS_TOKEN = "<|endoftext|>"
# Order matters: it fixes the ids the reference's embedding rows use.
SPECIAL_TOKENS = (AUDIO_TOKEN, END_OF_CHUNK_TOKEN, PAD_TOKEN, SEP_TOKEN)

DEFAULT_MAX_LEN = 512


class TokenizerError(ValueError):
    """A tokenizer directory or file that cannot serve AF2 (missing file, missing EOS token)."""


class AF2Tokenizer:
    """A `tokenizers.Tokenizer` with AF2's four special tokens and the ids the model needs."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, source: str = "<in memory>"):
        if tokenizer.token_to_id(EOS_TOKEN) is None:
            raise TokenizerError(f"{source}: tokenizer has no {EOS_TOKEN!r} token (AF2's end-of-sequence)")
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            # Appended after everything already there, in SPECIAL_TOKENS order, as the reference does.
            tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
        self._tok = tokenizer
        self.audio_id = tokenizer.token_to_id(AUDIO_TOKEN)
        self.eoc_id = tokenizer.token_to_id(END_OF_CHUNK_TOKEN)
        self.pad_id = tokenizer.token_to_id(PAD_TOKEN)
        self.sep_id = tokenizer.token_to_id(SEP_TOKEN)
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)

    @classmethod
    def from_dir(cls, path) -> "AF2Tokenizer":
        """Load an HF tokenizer directory (its tokenizer.json), adding AF2's special tokens if absent."""
        path = pathlib.Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json found")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust error says what is wrong; we add which file
            raise TokenizerError(f"{file}: cannot read tokenizer: {e}") from e
        return cls(tok, source=str(file))

    def save(self, directory) -> None:
        """Write tokenizer.json plus a tokenizer_config.json naming the special tokens (HF-loadable)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "sep_token": SEP_TOKEN,
            "additional_special_tokens": [AUDIO_TOKEN, END_OF_CHUNK_TOKEN],
            "padding_side": "right",
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=True applies the post-processor as HF's __call__ does (Qwen's adds nothing).
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))


def load_tokenizer(setting: str | None) -> AF2Tokenizer:
    """A training run's `tokenizer` setting: a tokenizer directory, or '' for the tiny tokenizer of the embedded
    synthetic dataset (what the tiny presets train with)."""
    if setting:
        return AF2Tokenizer.from_dir(setting)
    from af2_jax.data.synthetic import synthetic_tokenizer

    return synthetic_tokenizer()


def with_token_ids(config, tokenizer: AF2Tokenizer):
    """`config` (an AF2Config, or any dataclass with the same id fields) with the special-token ids of
    `tokenizer`: the one place where a tokenizer's ids enter a model config."""
    import dataclasses

    return dataclasses.replace(config, audio_token_id=tokenizer.audio_id, eoc_token_id=tokenizer.eoc_id,
                               pad_token_id=tokenizer.pad_id, sep_token_id=tokenizer.sep_id,
                               eos_token_id=tokenizer.eos_id)


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> AF2Tokenizer:
    """Train a small byte-level BPE (like Qwen's) on `texts`, deterministically and offline.

    `<|endoftext|>` is part of the base vocabulary (id 0); AF2's four special tokens come after it all.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorted, de-duplicated input: the result must not depend on the caller's order.
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    return AF2Tokenizer(tok, source="train_tiny_tokenizer")


def format_prompt(prompt: str) -> str:
    """The inference prompt text: `<audio>{prompt lowercased, stripped}<SEP>`."""
    return AUDIO_TOKEN + prompt.lower().strip() + SEP_TOKEN


def format_example(prompt: str, answer: str) -> str:
    """The training text: `<audio>{prompt}<SEP>{answer}<|endofchunk|><|endoftext|>`, lowercased and stripped."""
    return format_prompt(prompt) + answer.lower().strip() + END_OF_CHUNK_TOKEN + EOS_TOKEN


def encode_prompt(tok: AF2Tokenizer, prompt: str, max_len: int = DEFAULT_MAX_LEN) -> list[int]:
    """Token ids of the inference prompt, truncated on the right to `max_len` like the reference."""
    return tok.encode(format_prompt(prompt))[:max_len]


class PromptTooLongError(ValueError):
    """A prompt the reference would truncate, cutting off its `<SEP>`: the model would continue the question."""


def check_prompt(tok: AF2Tokenizer, prompt: str, max_len: int = DEFAULT_MAX_LEN) -> int:
    """The prompt's token count; raises PromptTooLongError when it exceeds `max_len`."""
    count = len(tok.encode(format_prompt(prompt)))
    if count > max_len:
        raise PromptTooLongError(f"the prompt is {count} tokens long, the limit is {max_len} (AF2's text length); "
                                 f"shorten it")
    return count


def answer_loss_mask(tok: AF2Tokenizer, ids: Sequence[int]) -> list[int]:
    """1 where a token is a training target, following the reference's label masking.

    Targets are the tokens after `<SEP>` up to and including `<|endofchunk|>`, plus every `<|endoftext|>`; `<SEP>`
    itself, the prompt, position 0, `<audio>` and padding are not. If the sequence ends inside an answer (it was
    truncated), that unfinished trailing answer is not a target either.
    """
    mask = [0] * len(ids)
    in_answer = False
    for t, token in enumerate(ids):
        if in_answer or token == tok.eos_id:
            mask[t] = 1
        if token == tok.sep_id:
            in_answer = True
        elif token == tok.eoc_id:
            in_answer = False
    for t, token in enumerate(ids):
        if t == 0 or token in (tok.pad_id, tok.audio_id):
            mask[t] = 0
    if in_answer:  # truncated mid-answer: drop the trailing run of answer tokens
        t = len(ids) - 1
        while t >= 0 and mask[t] == 1 and ids[t] not in (tok.eos_id, tok.eoc_id):
            mask[t] = 0
            t -= 1
    return mask


def encode_example(
    tok: AF2Tokenizer, prompt: str, answer: str, max_len: int = DEFAULT_MAX_LEN
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of the training text, truncated to `max_len`; mask[t] = 1 where ids[t] is a target."""
    ids = tok.encode(format_example(prompt, answer))[:max_len]
    return ids, answer_loss_mask(tok, ids)


def extract_answer(text: str) -> str:
    """The model's answer in decoded text: after the last `<SEP>`, without eos/pad/`<|endofchunk|>`, trimmed."""
    answer = text.rsplit(SEP_TOKEN, 1)[-1]
    for token in (EOS_TOKEN, PAD_TOKEN, END_OF_CHUNK_TOKEN):
        answer = answer.replace(token, "")
    return answer.strip()


# ---------------------------------------------------------------------------------------------------------------
# Several audios per text: Audio Flamingo 1's in-context-learning and chat formats with AF2's special tokens
# (../shared/docs/af1_reference.md sections 3 and 5; docs/ICL.md). AF1 writes a BOS and a "\nAnswer:" suffix; AF2 has
# neither (no BOS, `<SEP>` marks the answer), so both are left out. Text is lowercased and stripped as in AF2.

ICL_INTRO = {"similar": "here are similar examples. ", "random": "here are random examples. "}
CHAT_PREFIX = "the task is dialog. "
COT_SUFFIX = " Output the answer with <SUMMARY>, <CAPTION>, <REASONING>, and <CONCLUSION> tags."
COT_MAX_LEN = 1024  # the SoundCoT model's prompt and generation limit (af2_reference.md section 5)


def _clean(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    return text.lower().strip()


def _icl_head(kind: str, task: str | None) -> str:
    if kind not in ICL_INTRO:
        raise ValueError(f"ICL examples are {sorted(ICL_INTRO)}, got {kind!r}")
    prefix = f"the task is {_clean(task)}. " if task else ""
    return ICL_INTRO[kind] + prefix


def format_icl_prompt(examples: Sequence[tuple[str, str]], prompt: str, *, kind: str = "similar",
                      task: str | None = None) -> str:
    """The inference text of a few-shot prompt: `here are similar examples. ` (AF1's intro; `random` for randomly
    drawn examples), optionally `the task is {task}. `, then `<audio>{prompt_i}<SEP>{answer_i}<|endofchunk|>` per
    (prompt, answer) example and the query `<audio>{prompt}<SEP>`: one `<audio>` per clip, the query's last."""
    shots = "".join(AUDIO_TOKEN + _clean(p) + SEP_TOKEN + _clean(a) + END_OF_CHUNK_TOKEN for p, a in examples)
    return _icl_head(kind, task) + shots + AUDIO_TOKEN + _clean(prompt) + SEP_TOKEN


def format_icl_example(examples: Sequence[tuple[str, str]], prompt: str, answer: str, *, kind: str = "similar",
                       task: str | None = None) -> str:
    """The training text of a few-shot sample: `format_icl_prompt` + `{answer}<|endofchunk|><|endoftext|>`."""
    return format_icl_prompt(examples, prompt, kind=kind, task=task) + _clean(answer) + END_OF_CHUNK_TOKEN + EOS_TOKEN


def encode_icl_example(tok: AF2Tokenizer, examples: Sequence[tuple[str, str]], prompt: str, answer: str, *,
                       kind: str = "similar", task: str | None = None, max_len: int = DEFAULT_MAX_LEN
                       ) -> tuple[list[int], list[int], int]:
    """(ids, loss_mask, examples kept) of a few-shot sample. Every answer is a target (AF1 trains on the examples'
    answers too: `answer_loss_mask`). A text over `max_len` drops its FIRST examples until it fits, so the query and
    its answer are never cut and the `<audio>` count stays that of the clips kept (the last `kept` examples); AF1
    truncates the end instead, which can cut the query. Raises PromptTooLongError when the query alone is too long."""
    examples = list(examples)
    for first in range(len(examples) + 1):
        ids = tok.encode(format_icl_example(examples[first:], prompt, answer, kind=kind, task=task))
        if len(ids) <= max_len:
            return ids, answer_loss_mask(tok, ids), len(examples) - first
    raise PromptTooLongError(f"the query alone is {len(ids)} tokens long, the limit is {max_len}")


def chat_round_text(user: str, assistant: str | None = None, audios: int = 0) -> str:
    """One chat round, AF1's layout with AF2's tokens: the `<audio>` tokens of the clips attached at this round
    (AF1 puts its one clip before the first `user:`), `user: {q} \\nassistant: <SEP>`, and when answered
    `{a}<|endofchunk|><|endoftext|>\\n` (AF1 ends every answer with an eos, and trains on it)."""
    if audios < 0:
        raise ValueError(f"audios must be >= 0, got {audios}")
    text = AUDIO_TOKEN * audios + "user: " + _clean(user) + " \nassistant: " + SEP_TOKEN
    if assistant is None:
        return text
    return text + _clean(assistant) + END_OF_CHUNK_TOKEN + EOS_TOKEN + "\n"


def _chat_audio_counts(rounds: int, audio_turns: Sequence[int] | None) -> list[int]:
    counts = [0] * rounds
    for turn in (audio_turns if audio_turns is not None else [0]):
        if not 0 <= int(turn) < rounds:
            raise ValueError(f"an audio attached at round {turn} of a {rounds}-round dialogue")
        counts[int(turn)] += 1
    return counts


def format_chat(dialogue: Sequence[tuple[str, str]], *, audio_turns: Sequence[int] | None = None) -> str:
    """The training text of a dialogue of (user, assistant) rounds: `the task is dialog. ` then every round
    (`chat_round_text`). `audio_turns[i]` is the round clip i is attached to (default: one clip, at round 0)."""
    if not dialogue:
        raise ValueError("a dialogue needs at least one round")
    counts = _chat_audio_counts(len(dialogue), audio_turns)
    return CHAT_PREFIX + "".join(chat_round_text(u, a, n) for (u, a), n in zip(dialogue, counts))


def format_chat_prompt(history: Sequence[tuple[str, str]], question: str, *,
                       audio_turns: Sequence[int] | None = None) -> str:
    """The inference text of the next chat turn: the answered rounds of `history`, then `question` up to
    `assistant: <SEP>` (AF1 rebuilds this every turn). `audio_turns` index rounds of history + [question]."""
    counts = _chat_audio_counts(len(history) + 1, audio_turns)
    rounds = [chat_round_text(u, a, n) for (u, a), n in zip(history, counts)]
    return CHAT_PREFIX + "".join(rounds) + chat_round_text(question, None, counts[-1])


def encode_chat(tok: AF2Tokenizer, dialogue: Sequence[tuple[str, str]], *, audio_turns: Sequence[int] | None = None,
                max_len: int = DEFAULT_MAX_LEN) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a dialogue, truncated to `max_len` (as AF1: an answer cut off is not a target); every
    assistant answer with its `<|endofchunk|>` and eos is a target (`answer_loss_mask`)."""
    ids = tok.encode(format_chat(dialogue, audio_turns=audio_turns))[:max_len]
    return ids, answer_loss_mask(tok, ids)


def cot_prompt(prompt: str) -> str:
    """The AF2-SoundCoT question: the prompt with the reference's tag instruction appended (lowercased later, as
    every AF2 prompt)."""
    return prompt.rstrip() + COT_SUFFIX
