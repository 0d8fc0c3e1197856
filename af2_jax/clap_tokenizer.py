"""AF-CLAP's text tokenizer: an HF `tokenizer.json` (Flan-T5's, or a small one trained here) called as the reference
calls `T5Tokenizer` (afclap_reference.md section 1): the text, then `</s>`, truncated and right-padded with `<pad>` to
exactly 77 tokens (`padding='max_length', truncation=True, max_length=77`). Depends only on `tokenizers`.
"""
from __future__ import annotations

import pathlib
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

CONTEXT_LENGTH = 77
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, as in T5 and the afclap_tiny fixture


class ClapTokenizerError(ValueError):
    """A tokenizer file that cannot serve AF-CLAP (missing, unreadable, no <pad> or </s>)."""


class ClapTokenizer:
    """Texts -> (input_ids, attention_mask), each (B, context_length) int32."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, context_length: int = CONTEXT_LENGTH,
                 source: str = "<in memory>"):
        if context_length < 2:
            raise ClapTokenizerError(f"context_length must be >= 2, got {context_length}")
        for token in (PAD_TOKEN, EOS_TOKEN):
            if tokenizer.token_to_id(token) is None:
                raise ClapTokenizerError(f"{source}: tokenizer has no {token!r} token (T5's pad / end of sequence)")
        self._raw = tokenizer  # saved as loaded
        self.source = source
        self.context_length = context_length
        self.pad_id = tokenizer.token_to_id(PAD_TOKEN)
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)
        # A configured copy: T5's template (text, then </s>); truncation keeps room for the </s>, as HF's call does.
        tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS_TOKEN}",
                                                           special_tokens=[(EOS_TOKEN, self.eos_id)])
        tok.enable_truncation(max_length=context_length, strategy="longest_first", direction="right")
        tok.enable_padding(direction="right", pad_id=self.pad_id, pad_token=PAD_TOKEN, length=context_length)
        self._tok = tok

    @classmethod
    def from_file(cls, path, *, context_length: int = CONTEXT_LENGTH) -> "ClapTokenizer":
        """A tokenizer.json, or a directory holding one."""
        path = pathlib.Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ClapTokenizerError(f"{path}: no tokenizer.json found")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust error says what is wrong; we add which file
            raise ClapTokenizerError(f"{file}: not a readable HF tokenizer.json: {e}") from e
        return cls(tok, context_length=context_length, source=str(file))

    @property
    def vocab_size(self) -> int:
        return self._raw.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("ClapTokenizer takes a string or a sequence of strings")
        if not texts:
            empty = np.zeros((0, self.context_length), np.int32)
            return empty, empty.copy()
        encodings = self._tok.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], np.int32)
        mask = np.array([e.attention_mask for e in encodings], np.int32)
        return ids, mask

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory) -> pathlib.Path:
        """Writes directory/tokenizer.json (the tokenizer as loaded or trained) and returns its path."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / "tokenizer.json"
        self._raw.save(str(file))
        return file


def train_tokenizer(texts: Iterable[str], *, kind: str = "wordlevel", vocab_size: int = 1000, min_frequency: int = 1,
                    context_length: int = CONTEXT_LENGTH) -> ClapTokenizer:
    """A small T5-like tokenizer trained offline: <pad> 0, </s> 1, <unk> 2, then the vocabulary. 'wordlevel' splits on
    whitespace (as the afclap_tiny fixture's); 'bpe' learns subwords over Metaspace-marked words (T5's '▁' words)."""
    special = list(SPECIAL_TOKENS)
    if kind == "wordlevel":
        tok = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=special)
    elif kind == "bpe":
        tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'wordlevel' or 'bpe'")
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS_TOKEN}",
                                                       special_tokens=[(EOS_TOKEN, tok.token_to_id(EOS_TOKEN))])
    return ClapTokenizer(tok, context_length=context_length, source=f"<trained {kind}>")
