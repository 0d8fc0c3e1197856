"""AF-CLAP's retrieval metrics on similarity matrices whose ranks are known by construction."""
import numpy as np
import pytest

from af2_jax.evaluation import retrieval


def test_recall_counts_ranks_both_ways_with_several_captions_per_audio():
    # 3 audios, 5 captions: audio 0 owns captions 0, 1; audio 1 owns 2, 3; audio 2 owns 4
    owner = [0, 0, 1, 1, 2]
    sim = np.array([[0.1, 0.9, 0.2, 0.3, 0.0],    # audio 0: own caption 1 ranks first
                    [0.8, 0.1, 0.5, 0.2, 0.6],    # audio 1: best own (0.5) ranks third (0.8, 0.6 above)
                    [0.3, 0.2, 0.1, 0.9, 0.4]])   # audio 2: own caption 4 ranks second (0.9 above)
    got = retrieval.recall_at_k(sim, owner, ks=(1, 2, 3))
    assert got["audio_to_text_R@1"] == pytest.approx(1 / 3)
    assert got["audio_to_text_R@2"] == pytest.approx(2 / 3)
    assert got["audio_to_text_R@3"] == 1.0
    # text->audio, per column: caption 0 -> audio 0 scores 0.1, ranks 3rd; 1 -> 1st; 2 -> audio 1 0.5: 1st;
    # 3 -> audio 1 0.2: 3rd; 4 -> audio 2 0.4: 2nd (0.6 above)
    assert got["text_to_audio_R@1"] == pytest.approx(2 / 5)
    assert got["text_to_audio_R@2"] == pytest.approx(3 / 5)
    assert got["text_to_audio_R@3"] == 1.0


def test_ties_count_against_the_right_answer_so_a_constant_model_is_never_perfect():
    sim = np.zeros((4, 4))
    got = retrieval.recall_at_k(sim, [0, 1, 2, 3], ks=(1,))
    assert got["audio_to_text_R@1"] == 0.0 and got["text_to_audio_R@1"] == 0.0
    assert retrieval.zero_shot_accuracy(np.zeros((3, 2)), [0, 1, 0]) == 0.0
    assert retrieval.composition_accuracy(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3))) == 0.0


def test_zero_shot_and_composition():
    sim = np.array([[0.9, 0.1], [0.2, 0.3], [0.5, 0.4]])
    assert retrieval.zero_shot_accuracy(sim, [0, 1, 1]) == pytest.approx(2 / 3)
    audio = np.eye(3)
    true_text = np.array([[1.0, 0, 0], [0, 0.2, 0], [0, 0, 0.5]])
    swapped = np.array([[0.5, 0, 0], [0, 0.9, 0], [0, 0, 0.1]])
    assert retrieval.composition_accuracy(audio, true_text, swapped) == pytest.approx(2 / 3)


def test_bad_owners_are_errors():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval.recall_at_k(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="audio index"):
        retrieval.recall_at_k(np.zeros((2, 2)), [0, 5])
