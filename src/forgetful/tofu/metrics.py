"""The TOFU metrics as pure functions of per-example values (tested against hand computations).

Per evaluation set and example: ROUGE-L recall of the greedy generation against the answer;
probability ``p = exp(-NLL / answer_tokens)`` of the answer given the question (on real authors
and world facts normalised against the wrong options); truth ratio ``R = geomean(p_perturbed) /
p_correct`` with length-normalised probabilities. Aggregates: forget truth ratio = mean
``min(R, 1/R)``, other sets mean ``max(0, 1 - R)``; forget quality = KS-test p-value between the
per-example forget ``R`` of the model and of the retain model; model utility = harmonic mean of
{probability, ROUGE, truth ratio} x {retain, real authors, world facts}.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-10  # as in open-unlearning
EVAL_SETS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SETS = ("retain", "real_authors", "world_facts")


def rouge_l_recall(generations: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each generation against its reference (Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, gen)["rougeL"].recall for gen, ref in zip(generations, references)]


def probability(avg_nll: np.ndarray) -> np.ndarray:
    """Length-normalised probability ``exp(-NLL / tokens)`` from the per-token average NLL."""
    return np.exp(-np.asarray(avg_nll, dtype=np.float64))


def normalised_probability(true_avg_nll: np.ndarray, perturbed_avg_nll: np.ndarray) -> np.ndarray:
    """``p_true / (p_true + sum_j p_perturbed_j)`` per example (perturbed: ``[N, P]``)."""
    p_true = probability(true_avg_nll)
    p_pert = probability(perturbed_avg_nll).sum(-1)
    return p_true / (p_true + p_pert + EPS)


def truth_ratio(correct_avg_nll: np.ndarray, perturbed_avg_nll: np.ndarray) -> np.ndarray:
    """Per-example ``R = geomean_j p_perturbed_j / p_correct`` with length-normalised
    probabilities, i.e. ``exp(nll_correct - mean_j nll_perturbed_j)``."""
    p_wrong = np.exp(-np.asarray(perturbed_avg_nll, dtype=np.float64).mean(-1))
    p_correct = probability(correct_avg_nll)
    return p_wrong / (p_correct + EPS)


def truth_ratio_forget(r: np.ndarray) -> float:
    """Forget set: mean of ``min(R, 1/R)`` (1 = the model cannot tell true from false)."""
    r = np.asarray(r, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1.0 / (r + EPS))))


def truth_ratio_utility(r: np.ndarray) -> float:
    """Other sets: mean of ``max(0, 1 - R)`` (1 = the true answer is far more likely)."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(r, dtype=np.float64))))


def forget_quality(model_forget_r: Sequence[float], retain_forget_r: Sequence[float]) -> float:
    """KS-test p-value between the per-example forget truth ratios of a model and of the
    retain model (1 = indistinguishable from never having seen the forget set)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(model_forget_r), np.asarray(retain_forget_r)).pvalue)


def model_utility(summary: dict) -> float:
    """Harmonic mean of probability, ROUGE and truth ratio on retain, real authors, world facts."""
    from scipy.stats import hmean

    values = [summary[s][m] for s in UTILITY_SETS for m in ("prob", "rouge", "truth_ratio")]
    if min(values) <= 0:
        return 0.0
    return float(hmean(values))
