"""Caption metrics against values computed by hand (worked out in the comments), and the bootstrap."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from radiology.metrics import (
    METRICS,
    closed_answer,
    corpus_values,
    score_closed,
    bleu_from_statistics,
    bleu_statistics,
    bootstrap_indices,
    bootstrap_interval,
    cider_d,
    corpus_bleu,
    corpus_value,
    paired_difference,
    rouge_l,
    score_samples,
    sentence_bleu,
    words,
)

REF = "the cat sat on the mat"


# --------------------------------------------------------------------------- BLEU


def test_bleu_identical_and_disjoint():
    assert corpus_bleu([REF], [REF]) == pytest.approx(100.0)
    assert corpus_bleu(["dogs bark loudly at night here"], [REF]) == pytest.approx(0.0)
    assert sentence_bleu(REF, REF) == pytest.approx(100.0)


def test_bleu_partial_overlap():
    # hyp "the cat sat on the mat today" vs ref "the cat sat on the red mat" (7 words each, BP = 1):
    # 1-grams: the x2, cat, sat, on, mat match, today not -> 6/7
    # 2-grams: the-cat, cat-sat, sat-on, on-the match; the-mat, mat-today not -> 4/6
    # 3-grams: the-cat-sat, cat-sat-on, sat-on-the match; on-the-mat, the-mat-today not -> 3/5
    # 4-grams: the-cat-sat-on, cat-sat-on-the match; the other two not -> 2/4
    # BLEU = 100 * (6/7 * 4/6 * 3/5 * 2/4) ** (1/4) = 64.346
    expected = 100 * (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert corpus_bleu(["the cat sat on the mat today"], ["the cat sat on the red mat"]) == pytest.approx(expected)
    assert expected == pytest.approx(64.346, abs=1e-3)


def test_bleu_brevity_penalty():
    # "the cat sat on the" (5 words) vs REF (6): every n-gram matches, BP = exp(1 - 6/5) = 0.8187
    assert corpus_bleu(["the cat sat on the"], [REF]) == pytest.approx(100 * math.exp(-0.2))


def test_corpus_bleu_from_summed_statistics_matches_sacrebleu():
    hyps = [REF, "a spiculated nodule in the left lobe", "no acute findings", "the cat sat on the"]
    refs = [REF, "a spiculated nodule in the right upper lobe", "normal chest radiograph", "the cat sat on the mat"]
    stats = bleu_statistics(hyps, refs)
    assert stats.shape == (4, 10)
    assert bleu_from_statistics(stats.sum(axis=0)) == pytest.approx(corpus_bleu(hyps, refs))
    # Corpus BLEU pools n-gram counts: it is not the mean of sentence scores.
    assert corpus_bleu(hyps, refs) != pytest.approx(np.mean([sentence_bleu(h, r) for h, r in zip(hyps, refs)]))


# --------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_hand_cases():
    assert rouge_l(REF, REF) == pytest.approx(1.0)
    assert rouge_l("dogs bark loudly", REF) == pytest.approx(0.0)
    # LCS of "the cat is on the mat" and REF is "the cat on the mat" (5): P = R = 5/6, F = 5/6
    assert rouge_l("the cat is on the mat", REF) == pytest.approx(5 / 6)
    # "the cat" vs REF: LCS 2, P = 2/2, R = 2/6 -> F = 2PR/(P+R) = (2/3)/(4/3) = 0.5
    assert rouge_l("the cat", REF) == pytest.approx(0.5)


# --------------------------------------------------------------------------- CIDEr-D
# Two images with references "a b" and "c d": N = 2, each n-gram occurs in one reference,
# so every idf is log(2/1) = ln 2 (and an n-gram in no reference gets log(2) - log(max(1, 0)) = ln 2).


def test_cider_d_identical_and_disjoint():
    # "a b" vs "a b": order 1 cos = 1, order 2 cos = 1, orders 3-4 have no n-grams -> 0.
    # 10 * (1 + 1 + 0 + 0) / 4 = 5.0; "e f" shares nothing with "c d" -> 0.
    assert cider_d(["a b", "e f"], ["a b", "c d"]).tolist() == pytest.approx([5.0, 0.0])
    # Four distinct words: all four orders have cos 1 -> 10 * 4 / 4 = 10.
    refs = ["the cat sat down", "a dog ran off"]
    assert cider_d(refs, refs).tolist() == pytest.approx([10.0, 10.0])


def test_cider_d_partial_overlap():
    # "a x" vs "a b": order 1 vectors (a: ln2, x: ln2) and (a: ln2, b: ln2):
    # dot = ln2^2, norms sqrt(2) ln2 each -> cos = 1/2; order 2 "a x" vs "a b" -> 0.
    # 10 * (1/2) / 4 = 1.25
    assert cider_d(["a x", "c d"], ["a b", "c d"])[0] == pytest.approx(1.25)


def test_cider_d_clips_repeated_ngrams():
    # "a a" vs "a b": candidate (a: 2 ln2), clipped to min(2 ln2, ln2) = ln2 in the dot product:
    # dot = ln2 * ln2, norms 2 ln2 and sqrt(2) ln2 -> 1 / (2 sqrt 2) = 0.35355 (0.7071 unclipped)
    # 10 * 0.35355 / 4 = 0.88388
    assert cider_d(["a a", "c d"], ["a b", "c d"])[0] == pytest.approx(10 / 4 / (2 * math.sqrt(2)))


def test_cider_d_length_penalty():
    # "a b x x x x x x" (8 words) vs "a b" (2): penalty exp(-(8-2)^2 / (2 * 6^2)) = exp(-0.5).
    # order 1: (a: ln2, b: ln2, x: 6 ln2) vs (a, b: ln2): dot 2 ln2^2, norms sqrt(38) ln2, sqrt(2) ln2
    #          -> 2 / sqrt(76)
    # order 2: (ab: ln2, bx: ln2, xx: 5 ln2) vs (ab: ln2): dot ln2^2, norms sqrt(27) ln2, ln2 -> 1 / sqrt(27)
    # orders 3-4: the reference has none -> 0
    expected = 10 / 4 * math.exp(-0.5) * (2 / math.sqrt(76) + 1 / math.sqrt(27))
    assert cider_d(["a b x x x x x x", "c d"], ["a b", "c d"])[0] == pytest.approx(expected)
    assert expected == pytest.approx(0.63969, abs=1e-5)


def test_cider_d_ignores_ngrams_in_every_reference():
    # "a" occurs in both references: idf log(2/2) = 0, so a caption "a" carries no weight at all.
    assert cider_d(["a", "a"], ["a b", "a c"]).tolist() == pytest.approx([0.0, 0.0])


# --------------------------------------------------------------------------- per-image and corpus


def test_words_and_length_ratio():
    assert words("Sagittal T2-weighted MRI, L4-L5.") == ["sagittal", "t2-weighted", "mri", "l4-l5"]
    # generated 3 + 3 = 6 words against 2 + 2 = 4 reference words -> 1.5
    scores = score_samples(["a b c", "d e f"], ["a b", "d e"])
    assert corpus_value("length_ratio", scores) == pytest.approx(1.5)
    row = scores.row(0)  # what predictions.jsonl gets for image 0
    assert set(row) == {"bleu", "rouge_l", "cider_d", "words"}
    # "a b c" vs "a b": LCS 2, P = 2/3, R = 1 -> F = (4/3) / (5/3) = 0.8
    assert (row["words"], row["rouge_l"]) == (3, pytest.approx(0.8))


def test_score_samples_needs_aligned_inputs():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        score_samples(["a", "b"], ["a"])


def test_corpus_values_match_the_direct_computation():
    hyps = ["a spiculated nodule in the left lobe", "no acute findings", REF]
    refs = ["a spiculated nodule in the right upper lobe", "normal chest radiograph", REF]
    scores = score_samples(hyps, refs)
    assert corpus_value("bleu", scores) == pytest.approx(corpus_bleu(hyps, refs))
    assert corpus_value("rouge_l", scores) == pytest.approx(np.mean([rouge_l(h, r) for h, r in zip(hyps, refs)]))
    assert corpus_value("cider_d", scores) == pytest.approx(cider_d(hyps, refs).mean())
    with pytest.raises(ValueError, match="unknown metric"):
        corpus_value("meteor", scores)


# --------------------------------------------------------------------------- bootstrap


VOCAB = "the a of left right upper lower lobe nodule mass effusion fracture ct mri chest shows small large no acute".split()


def _synthetic(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """References, a close model (most words kept) and a far one (most words replaced)."""
    rng = random.Random(seed)
    refs, close, far = [], [], []
    for _ in range(n):
        ref = [rng.choice(VOCAB) for _ in range(rng.randint(5, 12))]
        refs.append(" ".join(ref))
        kept = ref[: rng.randint(len(ref) - 2, len(ref))] + [rng.choice(VOCAB)] * rng.randint(0, 3)  # lengths vary
        close.append(" ".join(w if rng.random() < 0.7 else rng.choice(VOCAB) for w in kept))
        far.append(" ".join(w if rng.random() < 0.2 else rng.choice(VOCAB) for w in ref))
    return refs, close, far


def test_bootstrap_indices_are_seeded():
    assert (bootstrap_indices(5, 10, seed=1) == bootstrap_indices(5, 10, seed=1)).all()
    assert not (bootstrap_indices(50, 10, seed=1) == bootstrap_indices(50, 10, seed=2)).all()
    with pytest.raises(ValueError, match="at least one scored image"):
        bootstrap_indices(0)


@pytest.mark.parametrize("metric", list(METRICS))
def test_interval_contains_estimate_and_shrinks_with_more_images(metric):
    widths = []
    for n in (25, 400):
        refs, close, _ = _synthetic(n, seed=n)
        scores = score_samples(close, refs)
        interval = bootstrap_interval(metric, scores, bootstrap_indices(n, 500, seed=0))
        assert interval.low <= interval.value <= interval.high
        widths.append(interval.high - interval.low)
    assert widths[0] > 0
    assert widths[1] < widths[0] / 2, f"{metric}: 16x the images should at least halve the interval ({widths})"


def test_paired_difference():
    refs, close, far = _synthetic(120, seed=7)
    good, bad = score_samples(close, refs), score_samples(far, refs)
    indices = bootstrap_indices(len(refs), 500, seed=0)
    for metric in ("bleu", "rouge_l", "cider_d"):
        diff = paired_difference(metric, good, bad, indices)
        assert diff.value == pytest.approx(corpus_value(metric, good) - corpus_value(metric, bad))
        assert 0 < diff.low <= diff.value <= diff.high, f"{metric}: the close model is clearly better"
        swapped = paired_difference(metric, bad, good, indices)
        assert (swapped.value, swapped.low, swapped.high) == pytest.approx((-diff.value, -diff.high, -diff.low))
        same = paired_difference(metric, good, good, indices)
        assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- closed (yes/no) questions


@pytest.mark.parametrize("answer, expected", [
    ("Yes", "yes"), ("Yes.", "yes"), ("yes, there is a nodule", "yes"), ("  YES!", "yes"), ('"Yes"', "yes"),
    ("No", "no"), ("no.", "no"), ("No, the lungs are clear.", "no"),
    ("There is no nodule.", None), ("none", None), ("yesterday", None), ("Nodule", None), ("not seen", None),
    ("2", None), ("", None), (None, None),
])
def test_a_yes_or_no_answer_is_read_from_its_first_word(answer, expected):
    assert closed_answer(answer) == expected


def test_closed_scores_count_an_answer_saying_neither_as_wrong():
    scores = score_closed(["Yes.", "no, it is not", "There is no effusion.", "yes"], ["yes", "Yes", "No", "no."])
    assert scores.answers == ["yes", "no", None, "yes"]
    assert scores.correct.tolist() == [True, False, False, False]
    assert scores.row(0) == {"answer": "yes", "correct": True} and scores.row(2) == {"answer": None, "correct": False}
    with pytest.raises(ValueError, match="must be yes or no"):
        score_closed(["Yes."], ["The right lobe."])


def test_accuracy_and_its_paired_difference_come_from_the_same_bootstrap():
    references = ["yes", "no"] * 50
    model = score_closed(["Yes." if i % 10 else "No." for i in range(100)], references)
    # Even i: reference yes; the model says yes except where i % 10 == 0: 40 of these 50 right.
    # Odd i: reference no; the model says yes (i % 10 is never 0): all 50 wrong. Accuracy 40/100.
    baseline = score_closed(["no"] * 100, references)  # right on every no-question: 50/100
    indices = bootstrap_indices(100, 500, seed=0)
    accuracy = bootstrap_interval("accuracy", model, indices)
    assert accuracy.value == pytest.approx(0.40) and accuracy.low < 0.40 < accuracy.high
    assert corpus_values("accuracy", model, indices).tolist() == model.correct[indices].mean(axis=1).tolist()
    diff = paired_difference("accuracy", model, baseline, indices)
    assert diff.value == pytest.approx(-0.10)
    expected = (model.correct[indices].mean(axis=1) - baseline.correct[indices].mean(axis=1))
    assert (diff.low, diff.high) == pytest.approx(tuple(np.percentile(expected, [2.5, 97.5])))
    with pytest.raises(ValueError, match="accuracy is computed from ClosedScores"):
        corpus_values("accuracy", score_samples(["a"], ["a"]), indices[:, :1])
    with pytest.raises(ValueError, match="bleu is a caption metric"):
        corpus_values("bleu", model, indices)
