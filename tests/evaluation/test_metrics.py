"""Answer metrics: option matching on the shapes AF2 answers take, exact match, token F1 from first principles."""
import collections
import fractions

import pytest

from af2_jax.evaluation import metrics

OPTIONS = {"a": "Dog barking", "b": "Cat meowing", "c": "Hot dog vendor", "d": "Rain"}


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("b", "b"),
        ("B", "b"),
        ("(B)", "b"),
        ("(b)", "b"),
        ("b)", "b"),
        ("B.", "b"),
        ("b) cat meowing", "b"),
        ("(B) Cat meowing.", "b"),
        ("B: cat meowing", "b"),
        ("answer: (b)", "b"),
        ("The correct option is B.", "b"),
        ("cat meowing", "b"),
        ("CAT MEOWING!", "b"),
        ("a cat meowing", "b"),  # the article is not a letter marker
        ("it is a cat meowing in the distance", "b"),
        ("dog barking", "a"),
        ("hot dog vendor", "c"),  # "dog" is shared with (A) but "hot"/"vendor" are (C)'s own
        ("rain", "d"),
        ("a. dog barking", "a"),
    ],
)
def test_match_option_accepts_letters_texts_and_both(prediction, letter):
    assert metrics.match_option(prediction, OPTIONS) == letter


@pytest.mark.parametrize(
    "prediction",
    [
        "",
        "a bird singing",  # names no option
        "dog barking or cat meowing",  # hedges between two options
        "b) dog barking",  # letter and text contradict each other
        "e",  # a letter that is not an option
        "dog",  # shared by (A) and (C), names neither alone
    ],
)
def test_match_option_refuses_unclear_predictions(prediction):
    assert metrics.match_option(prediction, OPTIONS) is None


def test_parse_options_reads_an_mmau_prompt():
    choices = ["Dog barking", "Cat meowing", "Hot dog vendor", "Rain"]
    prompt = "What is the sound? Choose the correct option from the following options:\n" + metrics.format_options(
        choices
    )
    assert prompt.endswith("(A) Dog barking\n(B) Cat meowing\n(C) Hot dog vendor\n(D) Rain")
    assert metrics.parse_options(prompt) == OPTIONS
    assert metrics.options_from_choices(choices) == OPTIONS


def test_mcq_correct_with_reference_as_letter_or_text():
    for reference in ("c", "(C)", "Hot dog vendor", "(C) Hot dog vendor"):
        assert metrics.mcq_correct("hot dog vendor", OPTIONS, reference) == 1.0
        assert metrics.mcq_correct("(c)", OPTIONS, reference) == 1.0
        assert metrics.mcq_correct("rain", OPTIONS, reference) == 0.0
        assert metrics.mcq_correct("nonsense", OPTIONS, reference) == 0.0
    with pytest.raises(ValueError, match="names none of the options"):
        metrics.mcq_correct("rain", OPTIONS, "thunder")


def test_yes_no_is_a_two_option_question():
    options = metrics.options_from_choices(["yes", "no"])
    assert metrics.mcq_correct("Yes.", options, "yes") == 1.0
    assert metrics.mcq_correct("no", options, "yes") == 0.0
    assert metrics.chance_accuracy(options) == 0.5
    assert metrics.chance_accuracy(OPTIONS) == 0.25


def test_exact_match_ignores_case_punctuation_articles_and_spacing():
    assert metrics.exact_match("The Dog,  barks!", "dog barks") == 1.0
    assert metrics.exact_match("a dog barks", "dog barked") == 0.0


def _f1_from_definition(prediction_words, reference_words):
    """Precision/recall over the multiset intersection, in exact fractions."""
    shared = sum(min(c, reference_words.count(w)) for w, c in collections.Counter(prediction_words).items())
    if shared == 0:
        return fractions.Fraction(0)
    p = fractions.Fraction(shared, len(prediction_words))
    r = fractions.Fraction(shared, len(reference_words))
    return 2 * p * r / (p + r)


def test_token_f1_matches_hand_worked_examples():
    # "the cat sat on the mat" -> cat sat on mat; "a cat on a mat" -> cat on mat: P = 3/4, R = 1, F1 = 6/7.
    assert metrics.token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7, abs=1e-12)
    # Repeats count at most as often as both sides have them: dog dog dog vs dog barks -> shared 1, P 1/3, R 1/2.
    assert metrics.token_f1("dog dog dog", "dog barks") == pytest.approx(2 / 5, abs=1e-12)
    assert metrics.token_f1("rain", "snow") == 0.0
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("", "x") == 0.0
    # Article- and punctuation-free, so plain split() is the normalised word list.
    cases = [("loud dog barks twice", "dog barks twice loudly"), ("b c b d", "d b b b c"), ("x y", "y x")]
    for pred, ref in cases:
        expected = _f1_from_definition(pred.split(), ref.split())
        assert metrics.token_f1(pred, ref) == pytest.approx(float(expected), abs=1e-12)
        assert metrics.token_f1(pred, ref) == pytest.approx(metrics.token_f1(ref, pred), abs=1e-12)
