"""Answer-level metrics: multiple-choice accuracy with robust option matching, exact match and token F1.

AF2 answers in free text (af2_reference.md section 5: lowercased, after `<SEP>`), so a multiple-choice prediction
may be the letter ("b", "(b)", "B."), the letter and the option ("b) dog barking"), the option text alone in any
case or punctuation, or a sentence containing it. `match_option` maps such text to one option letter or to None
when the text names no option or names two that contradict each other. The text rule follows the MMAU benchmark's
published string match: the option's words are all in the prediction and no word that only another option has is.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Mapping, Sequence

# SQuAD-style normalisation: articles carry no answer content and models add or drop them freely.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]")
# An MMAU option line in a prompt: "(A) dog barking".
_OPTION_LINE = re.compile(r"^\s*\(([A-Za-z])\)\s*(.*?)\s*$", re.MULTILINE)
# Lead-ins a model may put before its choice: "answer: b", "the correct option is (b)".
_LEAD_IN = re.compile(r"^(?:the\s+)?(?:correct\s+|right\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*")
# A letter marker at the start of a prediction: "(b) ...", "b) ...", "b. ...", "b: ...", or a bare "b".
_LETTER_IN_PARENS = re.compile(r"^\(([a-z])\)\s*(.*)$", re.DOTALL)
_LETTER_WITH_MARK = re.compile(r"^([a-z])[).:](?:\s+(.*))?$", re.DOTALL)
_BARE_LETTER = re.compile(r"^([a-z])$")


def normalize_text(text: str) -> str:
    """Lowercase, punctuation to spaces, articles dropped, whitespace collapsed."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def words(text: str) -> list[str]:
    """The normalised words of `text` (the unit of exact match, token F1 and option matching)."""
    return normalize_text(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the two texts are equal after `normalize_text`, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of word precision and recall, counting repeated words as many times as both texts share them."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)  # both empty is a perfect match; one empty shares nothing
    shared = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_options(prompt: str) -> dict[str, str]:
    """The options listed in an MMAU-style prompt, `{'a': 'dog barking', 'b': ...}` (letters lowercased)."""
    return {m.group(1).lower(): m.group(2) for m in _OPTION_LINE.finditer(prompt)}


def options_from_choices(choices: Sequence[str]) -> dict[str, str]:
    """Letters a, b, c, ... for a list of choices, in order (how an MMAU prompt lists them)."""
    if len(choices) > 26:
        raise ValueError(f"{len(choices)} choices: at most 26 can carry a letter")
    return {string.ascii_lowercase[i]: c for i, c in enumerate(choices)}


def format_options(choices: Sequence[str]) -> str:
    """The options block of an MMAU prompt: "(A) first\\n(B) second..."."""
    return "\n".join(f"({letter.upper()}) {text}" for letter, text in options_from_choices(choices).items())


def _leading_letter(text: str) -> tuple[str, str] | None:
    """(letter, rest) when `text` (lowercased, stripped) opens with a letter marker, else None."""
    for pattern in (_LETTER_IN_PARENS, _LETTER_WITH_MARK, _BARE_LETTER):
        m = pattern.match(text)
        if m:
            rest = m.group(2) if pattern.groups >= 2 else None
            return m.group(1), (rest or "").strip()
    return None


def match_option_text(text: str, options: Mapping[str, str]) -> str | None:
    """The one option `text` names by its words (MMAU's rule), or None; letters in `text` mean nothing here.

    For closed answer sets asked without letters ("how many beeps?" over one..four), where a bare "a" is a word.
    """
    norm = normalize_text(text)
    if not norm:
        return None
    option_norms = {letter: normalize_text(option) for letter, option in options.items()}
    equal = [letter for letter, option in option_norms.items() if option and option == norm]
    if len(equal) == 1:
        return equal[0]
    pred_words = set(norm.split())
    option_words = {letter: set(option.split()) for letter, option in option_norms.items()}
    named = []
    for letter, own in option_words.items():
        if not own or not own <= pred_words:
            continue
        # Words only the other options have; a prediction that uses one of them is hedging or names another.
        others = set().union(*(w - own for k, w in option_words.items() if k != letter and w != own))
        if pred_words.isdisjoint(others):
            named.append(letter)
    return named[0] if len(named) == 1 else None


def match_option(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter (lowercase) that `prediction` chooses, or None if it chooses none or is contradictory.

    A leading letter marker wins ("b", "(B)", "b) dog", "answer: b."), unless the text after it names a different
    option exactly; otherwise the prediction is matched to the option texts by their words.
    """
    text = prediction.strip().lower()
    stripped = _LEAD_IN.sub("", text)
    text = stripped or text
    marker = _leading_letter(text.rstrip(".!"))
    if marker is not None and marker[0] in options:
        letter, rest = marker
        if rest:
            named = match_option_text(rest, options)
            if named is not None and named != letter and normalize_text(rest) == normalize_text(options[named]):
                return None  # "b) cat" where (B) is "dog": the model contradicts itself
        return letter
    return match_option_text(text, options)


def resolve_reference_option(answer: str, options: Mapping[str, str]) -> str:
    """The letter of the correct option from a reference answer given as a letter, "(b) text" or the option text."""
    letter = match_option(answer, options)
    if letter is None:
        raise ValueError(f"reference answer {answer!r} names none of the options {dict(options)!r}")
    return letter


def mcq_correct(prediction: str, options: Mapping[str, str], answer: str) -> float:
    """1.0 if `prediction` chooses the same option as the reference `answer`, else 0.0."""
    return float(match_option(prediction, options) == resolve_reference_option(answer, options))


def chance_accuracy(options: Mapping[str, str]) -> float:
    """Expected accuracy of a uniform random pick among the options."""
    if not options:
        raise ValueError("no options: chance level is undefined for an open answer")
    return 1.0 / len(options)
