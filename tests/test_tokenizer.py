"""AF2 tokenizer: special-token ids after the base vocabulary, prompt format, and the answer-span loss mask."""
import json

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from af2_jax import tokenizer as af2_tok

TEXTS = [
    "how many beeps are there?", "three", "which came first, the beep or the noise?", "the beep came first",
    "is the second tone higher or lower than the first?", "higher", "lower", "a loud whistle, then silence",
]


@pytest.fixture(scope="module")
def tok():
    return af2_tok.train_tiny_tokenizer(TEXTS, vocab_size=400)


def _qwen_like_tokenizer_json(tmp_path, n_extra_specials=3):
    """A byte-level BPE with Qwen's layout: base vocab, then `<|endoftext|>` and more specials as added tokens."""
    base = af2_tok.train_tiny_tokenizer(TEXTS, vocab_size=300).backend
    vocab = {t: i for t, i in base.get_vocab(with_added_tokens=False).items() if t != af2_tok.EOS_TOKEN}
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    merges = json.loads(base.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    raw = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = [af2_tok.EOS_TOKEN] + [f"<|extra_{i}|>" for i in range(n_extra_specials)]
    raw.add_special_tokens(specials)
    d = tmp_path / "qwen_like"
    d.mkdir()
    raw.save(str(d / "tokenizer.json"))
    return d, len(vocab), len(specials)


def test_special_tokens_follow_base_vocab_in_reference_order(tmp_path):
    directory, n_base, n_specials = _qwen_like_tokenizer_json(tmp_path)
    tok = af2_tok.AF2Tokenizer.from_dir(directory)
    first_new = n_base + n_specials  # Qwen2.5: 151643 + 22 = 151665
    assert [tok.audio_id, tok.eoc_id, tok.pad_id, tok.sep_id] == list(range(first_new, first_new + 4))
    assert tok.eos_id == n_base
    assert len(tok) == first_new + 4
    assert [tok.id_to_token(i) for i in range(first_new, first_new + 4)] == list(af2_tok.SPECIAL_TOKENS)


def test_save_and_reload_keeps_ids_and_adds_nothing(tmp_path, tok):
    tok.save(tmp_path / "t")
    again = af2_tok.AF2Tokenizer.from_dir(tmp_path / "t")
    assert len(again) == len(tok)
    for name in ("audio_id", "eoc_id", "pad_id", "sep_id", "eos_id"):
        assert getattr(again, name) == getattr(tok, name)
    text = af2_tok.format_example("How many beeps?", "Three")
    assert again.encode(text) == tok.encode(text)
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    assert config["pad_token"] == af2_tok.PAD_TOKEN and config["sep_token"] == af2_tok.SEP_TOKEN


def test_tiny_tokenizer_is_deterministic_and_has_eos_in_base_vocab():
    a = af2_tok.train_tiny_tokenizer(TEXTS, vocab_size=400)
    b = af2_tok.train_tiny_tokenizer(list(reversed(TEXTS)) + TEXTS[:2], vocab_size=400)
    assert a.backend.to_str() == b.backend.to_str()
    assert a.eos_id < a.backend.get_vocab_size(with_added_tokens=False)
    assert min(a.audio_id, a.eoc_id, a.pad_id, a.sep_id) >= a.backend.get_vocab_size(with_added_tokens=False)


def test_bad_tokenizer_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(af2_tok.TokenizerError, match="no tokenizer.json"):
        af2_tok.AF2Tokenizer.from_dir(tmp_path)
    raw = tokenizers.Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(af2_tok.TokenizerError, match="endoftext"):
        af2_tok.AF2Tokenizer.from_dir(tmp_path)


def test_prompt_format_is_lowercased_and_stripped(tok):
    assert af2_tok.format_prompt("  How MANY Beeps? ") == "<audio>how many beeps?<SEP>"
    ids = af2_tok.encode_prompt(tok, "  How MANY Beeps? ")
    assert ids[0] == tok.audio_id and ids[-1] == tok.sep_id
    assert tok.decode(ids) == "<audio>how many beeps?<SEP>"
    assert len(af2_tok.encode_prompt(tok, "how many beeps? " * 50, max_len=7)) == 7


def _expected_example(tok, prompt, answer):
    """Independent construction: tokenize the segments separately (special tokens split the text anyway)."""
    raw = tok.backend
    prompt_ids = [tok.audio_id] + raw.encode(prompt.lower().strip()).ids + [tok.sep_id]
    answer_ids = raw.encode(answer.lower().strip()).ids + [tok.eoc_id, tok.eos_id]
    return prompt_ids + answer_ids, [0] * len(prompt_ids) + [1] * len(answer_ids), len(prompt_ids)


@pytest.mark.parametrize("prompt,answer", [
    ("How many beeps are there?", "Three"),
    ("Which came first, the beep or the noise?", "The beep came first"),
    ("is the second tone higher or lower than the first?", "  HIGHER "),
])
def test_loss_mask_covers_exactly_the_answer_span(tok, prompt, answer):
    ids, mask = af2_tok.encode_example(tok, prompt, answer)
    expected_ids, expected_mask, _ = _expected_example(tok, prompt, answer)
    assert ids == expected_ids
    assert mask == expected_mask
    # And read back from the token strings: the targets decode to the answer + the two closing tokens.
    targets = tok.decode([i for i, m in zip(ids, mask) if m])
    assert targets == answer.lower().strip() + af2_tok.END_OF_CHUNK_TOKEN + af2_tok.EOS_TOKEN


def test_truncation_masks_an_unfinished_answer(tok):
    prompt, answer = "which came first, the beep or the noise?", "the beep came first, then the noise"
    full_ids, full_mask, n_prompt = _expected_example(tok, prompt, answer)
    n = len(full_ids)
    for max_len in range(1, n + 1):
        ids, mask = af2_tok.encode_example(tok, prompt, answer, max_len=max_len)
        assert ids == full_ids[:max_len]
        ends_in_open_answer = n_prompt <= max_len < n - 1  # cut before <|endofchunk|> survives
        expected = [0] * max_len if ends_in_open_answer else full_mask[:max_len]
        assert mask == expected, max_len


def test_extract_answer_takes_text_after_last_sep():
    text = "<audio>q one<SEP>x<SEP> The Beep <|endofchunk|><|endoftext|><|PAD_TOKEN|><|PAD_TOKEN|>"
    assert af2_tok.extract_answer(text) == "The Beep"
    assert af2_tok.extract_answer("no separator at all ") == "no separator at all"
