"""Caption metrics that need no model download, with bootstrap intervals over images.

    scores = score_samples(hypotheses, references)          # per-image scores of one model
    indices = bootstrap_indices(len(references), 1000, seed=0)
    bootstrap_interval("bleu", scores, indices)            # corpus value and its 95% interval
    paired_difference("bleu", tuned, base, indices)        # tuned - base, same resamples for both

- BLEU: sacrebleu's corpus BLEU (13a tokenizer, exp smoothing, 0-100). Per image: sentence BLEU.
- ROUGE-L: rouge-score's F-measure on the longest common subsequence, Porter-stemmed (0-1).
- CIDEr-D (Vedantam et al., CVPR 2015), implemented here from the paper: tf-idf n-gram vectors
  (n = 1..4, idf over the references of the evaluated images), clipped candidate counts, a Gaussian
  length penalty (sigma 6), times 10 (0-10, the coco-caption scale; papers often print x100).
- Length: generated words / reference words over the corpus (1.0 = as long as the references).
- Accuracy of closed (yes/no) questions: the share of questions whose answer says the reference's
  yes or no (see ``closed_answer`` for the rule); an answer saying neither counts as wrong.

    closed = score_closed(answers, references)            # references all yes or no
    bootstrap_interval("accuracy", closed, bootstrap_indices(len(closed), 1000, seed=0))

Corpus values are recomputed on each bootstrap resample of images (BLEU from summed n-gram
counts, not from averaged sentence scores); CIDEr-D keeps the idf of the full set of references.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

__all__ = [
    "CLOSED_METRICS",
    "METRICS",
    "YES_NO_RULE",
    "ClosedScores",
    "Interval",
    "MetricInfo",
    "SampleScores",
    "bleu_from_statistics",
    "bleu_signature",
    "bleu_statistics",
    "bootstrap_indices",
    "bootstrap_interval",
    "cider_d",
    "closed_answer",
    "corpus_bleu",
    "corpus_value",
    "corpus_values",
    "paired_difference",
    "rouge_l",
    "score_closed",
    "score_samples",
    "sentence_bleu",
    "words",
]

MAX_ORDER = 4
CIDER_SIGMA = 6.0

_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")

# One scorer of each kind: building them is not free, and they hold no per-call state.
_CORPUS_BLEU = BLEU()
_SENTENCE_BLEU = BLEU(effective_order=True)  # short captions lack 4-grams; effective order avoids all-zero scores
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@dataclass(frozen=True)
class MetricInfo:
    """How a corpus metric is named, scaled and read."""

    label: str
    scale: str
    higher_is_better: bool | None  # None: neither direction is better (length)


METRICS: dict[str, MetricInfo] = {
    "bleu": MetricInfo("BLEU", "0-100 (sacrebleu)", True),
    "rouge_l": MetricInfo("ROUGE-L F", "0-1", True),
    "cider_d": MetricInfo("CIDEr-D", "0-10 (coco-caption scale)", True),
    "length_ratio": MetricInfo("Length ratio", "generated / reference words; 1 = same length", None),
}
# Closed (yes/no) questions are scored by accuracy instead of word overlap.
CLOSED_METRICS: dict[str, MetricInfo] = {
    "accuracy": MetricInfo("Accuracy (yes/no)", "0-1, share of closed questions answered right", True),
}

YES_NO_RULE = (
    "an answer is yes or no when its first word, lower-cased, after any spaces and punctuation, is 'yes' or 'no' "
    "('Yes.', 'yes, there is a nodule' -> yes; 'No' -> no; 'There is no nodule', 'none', 'yesterday' -> neither); "
    "a question is closed when its reference answer is yes or no by this rule, and a closed question's answer is "
    "right when it says the same"
)
_FIRST_WORD = re.compile(r"[\W_]*([a-z]+)(?![a-z0-9])")


# --------------------------------------------------------------------------- per-image scores


def words(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation dropped (hyphenated terms such as L4-L5 stay whole)."""
    return _WORD.findall(text.lower())


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Sentence BLEU (0-100) of one caption against its reference."""
    return float(_SENTENCE_BLEU.sentence_score(hypothesis, [reference]).score)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100), one reference per hypothesis."""
    return float(_CORPUS_BLEU.corpus_score(list(hypotheses), [list(references)]).score)


def bleu_signature() -> str:
    """sacrebleu's signature of the corpus BLEU settings, for reproducibility."""
    return str(_CORPUS_BLEU.get_signature())


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-image BLEU sufficient statistics, shape (n, 2 + 2*4):
    hypothesis length, reference length, matches per order 1..4, totals per order 1..4."""
    rows = []
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        score = _CORPUS_BLEU.corpus_score([hypothesis], [[reference]])
        rows.append([score.sys_len, score.ref_len, *score.counts, *score.totals])
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 2 + 2 * MAX_ORDER)


def bleu_from_statistics(statistics: np.ndarray) -> float:
    """Corpus BLEU (0-100) from summed statistics (one row of ``bleu_statistics`` summed over images)."""
    sys_len, ref_len = int(statistics[0]), int(statistics[1])
    correct = [int(c) for c in statistics[2 : 2 + MAX_ORDER]]
    total = [int(t) for t in statistics[2 + MAX_ORDER :]]
    return float(BLEU.compute_bleu(correct, total, sys_len, ref_len, smooth_method="exp").score)


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure (0-1) of one caption against its reference."""
    return float(_ROUGE.score(reference, hypothesis)["rougeL"].fmeasure)


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def cider_d(
    hypotheses: Sequence[str], references: Sequence[str], sigma: float = CIDER_SIGMA, max_order: int = MAX_ORDER
) -> np.ndarray:
    """Per-image CIDEr-D (0-10) with one reference per image; the idf comes from all ``references``.

    For each order n: cosine-like similarity of tf-idf vectors with the candidate's weights clipped
    at the reference's, times exp(-(len(c) - len(s))^2 / (2 sigma^2)); averaged over n, times 10.
    Lengths are in words, as in the paper (coco-caption counts bigrams: it differs only under two words).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    ref_tokens = [words(r) for r in references]
    hyp_tokens = [words(h) for h in hypotheses]
    ref_grams = [[_ngrams(t, n) for n in range(1, max_order + 1)] for t in ref_tokens]
    hyp_grams = [[_ngrams(t, n) for n in range(1, max_order + 1)] for t in hyp_tokens]
    # Document frequency: in how many images' references each n-gram occurs.
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for grams in ref_grams:
        for counts in grams:
            document_frequency.update(counts.keys())
    log_images = math.log(len(references)) if references else 0.0

    def tfidf(counts: Counter[tuple[str, ...]]) -> tuple[dict[tuple[str, ...], float], float]:
        # n-grams never seen in a reference get the largest idf, log(N), as in coco-caption.
        vector = {g: tf * (log_images - math.log(max(1, document_frequency[g]))) for g, tf in counts.items()}
        return vector, math.sqrt(sum(v * v for v in vector.values()))

    scores = np.zeros(len(references), dtype=np.float64)
    for i, (hyp, ref) in enumerate(zip(hyp_grams, ref_grams)):
        penalty = math.exp(-((len(hyp_tokens[i]) - len(ref_tokens[i])) ** 2) / (2 * sigma**2))
        total = 0.0
        for hyp_counts, ref_counts in zip(hyp, ref):
            hyp_vec, hyp_norm = tfidf(hyp_counts)
            ref_vec, ref_norm = tfidf(ref_counts)
            if hyp_norm == 0 or ref_norm == 0:
                continue  # no n-grams of this order (or only ones in every reference): contributes 0
            # Clipping (the "-D"): repeating a matching n-gram cannot raise the score.
            dot = sum(min(w, ref_vec[g]) * ref_vec[g] for g, w in hyp_vec.items() if g in ref_vec)
            total += penalty * dot / (hyp_norm * ref_norm)
        scores[i] = 10.0 * total / max_order
    return scores


@dataclass
class SampleScores:
    """One model's per-image scores over the scored images (aligned arrays of length n)."""

    bleu_statistics: np.ndarray  # (n, 10) summed for corpus BLEU
    bleu: np.ndarray  # sentence BLEU, 0-100
    rouge_l: np.ndarray  # 0-1
    cider_d: np.ndarray  # 0-10
    words: np.ndarray  # generated words
    reference_words: np.ndarray

    def __len__(self) -> int:
        return len(self.bleu)

    def row(self, i: int) -> dict[str, float | int]:
        """Image i's scores, as written to predictions.jsonl."""
        return {
            "bleu": round(float(self.bleu[i]), 4),
            "rouge_l": round(float(self.rouge_l[i]), 4),
            "cider_d": round(float(self.cider_d[i]), 4),
            "words": int(self.words[i]),
        }


def score_samples(hypotheses: Sequence[str], references: Sequence[str]) -> SampleScores:
    """Every per-image score of one model's captions against the references."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return SampleScores(
        bleu_statistics=bleu_statistics(hypotheses, references),
        bleu=np.array([sentence_bleu(h, r) for h, r in zip(hypotheses, references)], dtype=np.float64),
        rouge_l=np.array([rouge_l(h, r) for h, r in zip(hypotheses, references)], dtype=np.float64),
        cider_d=cider_d(hypotheses, references),
        words=np.array([len(words(h)) for h in hypotheses], dtype=np.int64),
        reference_words=np.array([len(words(r)) for r in references], dtype=np.int64),
    )


# --------------------------------------------------------------------------- closed (yes/no) questions


def closed_answer(text: str | None) -> str | None:
    """'yes' or 'no' when ``text`` answers so by YES_NO_RULE (its first word), else None."""
    match = _FIRST_WORD.match((text or "").lower())
    word = match.group(1) if match else None
    return word if word in ("yes", "no") else None


@dataclass
class ClosedScores:
    """One model's answers to the closed questions (aligned arrays of length n)."""

    answers: list[str | None]  # 'yes', 'no', or None when the answer says neither
    correct: np.ndarray  # bool: the answer says the reference's yes or no

    def __len__(self) -> int:
        return len(self.correct)

    def row(self, i: int) -> dict[str, str | bool | None]:
        """Question i's score, as written to predictions.jsonl."""
        return {"answer": self.answers[i], "correct": bool(self.correct[i])}


def score_closed(hypotheses: Sequence[str], references: Sequence[str]) -> ClosedScores:
    """Each answer to a closed question read as yes or no (YES_NO_RULE) and checked against its reference."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    expected = [closed_answer(r) for r in references]
    if None in expected:
        raise ValueError("every reference of a closed question must be yes or no (see YES_NO_RULE)")
    answers = [closed_answer(h) for h in hypotheses]
    return ClosedScores(answers, np.array([a == e for a, e in zip(answers, expected)], dtype=bool))


# --------------------------------------------------------------------------- corpus values


def corpus_values(metric: str, scores: SampleScores | ClosedScores, indices: np.ndarray) -> np.ndarray:
    """The corpus value of ``metric`` on each row of image (or question) indices, shape (B, n) -> (B,).
    ``accuracy`` takes a model's ClosedScores, the caption metrics its SampleScores."""
    indices = np.atleast_2d(indices)
    if metric == "accuracy":
        if not isinstance(scores, ClosedScores):
            raise ValueError("accuracy is computed from ClosedScores (score_closed)")
        return scores.correct[indices].mean(axis=1)
    if isinstance(scores, ClosedScores):
        raise ValueError(f"{metric} is a caption metric: give SampleScores (score_samples)")
    if metric == "bleu":
        summed = scores.bleu_statistics[indices].sum(axis=1)  # (B, 10)
        return np.array([bleu_from_statistics(row) for row in summed])
    if metric == "rouge_l":
        return scores.rouge_l[indices].mean(axis=1)
    if metric == "cider_d":
        return scores.cider_d[indices].mean(axis=1)
    if metric == "length_ratio":
        reference = scores.reference_words[indices].sum(axis=1).astype(np.float64)
        return scores.words[indices].sum(axis=1) / np.maximum(reference, 1.0)
    raise ValueError(f"unknown metric {metric!r}; choose from {', '.join([*METRICS, *CLOSED_METRICS])}")


def corpus_value(metric: str, scores: SampleScores | ClosedScores) -> float:
    """The corpus value of ``metric`` over all scored images."""
    return float(corpus_values(metric, scores, np.arange(len(scores)))[0])


# --------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def as_dict(self, digits: int = 4) -> dict[str, float | list[float]]:
        """{"value": x, "ci95": [low, high]}, rounded for the JSON file."""
        return {"value": round(self.value, digits), "ci95": [round(self.low, digits), round(self.high, digits)]}


def bootstrap_indices(n: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(resamples, n) image indices drawn with replacement; share them across models to pair them."""
    if n < 1:
        raise ValueError("the bootstrap needs at least one scored image")
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(
    metric: str, scores: SampleScores | ClosedScores, indices: np.ndarray, confidence: float = 0.95
) -> Interval:
    """Corpus value of ``metric`` with its percentile bootstrap interval over images."""
    low, high = _percentiles(corpus_values(metric, scores, indices), confidence)
    return Interval(corpus_value(metric, scores), low, high)


def paired_difference(
    metric: str,
    model: SampleScores | ClosedScores,
    baseline: SampleScores | ClosedScores,
    indices: np.ndarray,
    confidence: float = 0.95,
) -> Interval:
    """model - baseline for ``metric``, with a paired bootstrap interval (both scored on the same resamples)."""
    if len(model) != len(baseline):
        raise ValueError("paired scores must cover the same images")
    differences = corpus_values(metric, model, indices) - corpus_values(metric, baseline, indices)
    low, high = _percentiles(differences, confidence)
    return Interval(corpus_value(metric, model) - corpus_value(metric, baseline), low, high)
