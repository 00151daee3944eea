"""The TOFU metrics as pure functions of per-example values (tested against hand computations),
as open-unlearning's code computes them (``src/evals/metrics/``; its epsilons included).

Per evaluation set and example: ROUGE-L recall of the greedy generation against the answer;
probability ``p = exp(-NLL / scored_tokens)`` of the answer given the question (on real authors
and world facts normalised against the wrong options: ``p / (p + sum p_wrong + 1e-10)``); truth
ratio ``R = geomean(p_perturbed) / (p_correct + 1e-10)`` with length-normalised probabilities.
Aggregates: forget truth ratio = mean ``min(R, 1/(R + 1e-10))``, other sets mean
``max(0, 1 - R)``; forget quality = KS-test p-value between the raw per-example forget ``R`` of
the model and of the retain model; model utility = harmonic mean of {probability, ROUGE, truth
ratio} x {retain, real authors, world facts} (0 when one is 0); its uncertainty over the questions
asked: a paired bootstrap that resamples each utility set's questions, the same resamples for every
run (:func:`bootstrap_model_utility`).

Membership and memorisation on the forget set: the Min-K% score (the mean NLL of the ``k = 40%``
least likely answer tokens, the last scored token left out), the AUC of forget (label 0) against
holdout (label 1) scores, privleak = ``((1 - AUC) - (1 - AUC_ref)) / ((1 - AUC_ref) + 1e-10) * 100``
(``AUC_ref`` the retain model's, 0.5 without it), and extraction strength ``1 - k / n`` with ``k``
the first position from which every teacher-forced greedy prediction is right (last token left
out; ``k`` never exceeds ``n - 1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-10  # as in open-unlearning
EVAL_SETS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rouge", "truth_ratio")  # per utility set: model utility's nine parts


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
    """Forget set: mean of ``min(R, 1/(R + 1e-10))`` (1 = the model cannot tell true from false)."""
    r = np.asarray(r, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1.0 / (r + EPS))))


def truth_ratio_utility(r: np.ndarray) -> float:
    """Other sets: mean of ``max(0, 1 - R)`` (1 = the true answer is far more likely)."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(r, dtype=np.float64))))


def forget_quality(model_forget_r: Sequence[float], retain_forget_r: Sequence[float]) -> float:
    """KS-test p-value (``scipy.stats.ks_2samp``, two-sided, exact for small samples) between
    the raw per-example forget truth ratios of a model and of the retain model (1 =
    indistinguishable from never having seen the forget set)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(model_forget_r), np.asarray(retain_forget_r)).pvalue)


def model_utility(summary: dict) -> float:
    """Harmonic mean of probability, ROUGE and truth ratio on retain, real authors, world facts."""
    from scipy.stats import hmean

    values = [summary[s][m] for s in UTILITY_SETS for m in UTILITY_METRICS]
    if min(values) <= 0:
        return 0.0
    return float(hmean(values))


def utility_contributions(per_example: dict) -> dict[str, np.ndarray]:
    """Per utility set, an ``[examples, 3]`` array of each example's probability, ROUGE and
    ``max(0, 1 - R)``: the nine parts of model utility are its column means."""
    out = {}
    for name in UTILITY_SETS:
        s = per_example[name]
        r = np.asarray(s["truth_ratio"], dtype=np.float64)
        prob, rouge = (np.asarray(s[k], dtype=np.float64) for k in ("prob", "rouge"))
        out[name] = np.stack([prob, rouge, np.maximum(0.0, 1.0 - r)], axis=1)
    return out


def bootstrap_model_utility(
    per_example_by_run: dict[str, dict], *, samples: int = 2000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Model utility of every run on ``samples`` bootstrap resamples of each utility set's
    questions, ``[samples]`` per run. Paired: resample ``b`` asks every run the same questions, so
    ``mu[a][b] / mu[c][b]`` is a resample of the ratio of two runs' utilities. Every run must have
    been evaluated on the same number of examples per set (the same questions, in the same order)."""
    contributions = {run: utility_contributions(pe) for run, pe in per_example_by_run.items()}
    if not contributions:
        return {}
    sizes = {run: {s: len(c[s]) for s in UTILITY_SETS} for run, c in contributions.items()}
    first = next(iter(sizes.values()))
    if any(n != first for n in sizes.values()):
        raise ValueError(f"the runs were evaluated on different numbers of examples: {sizes}")
    if any(n == 0 for n in first.values()):
        raise ValueError(f"a utility set has no examples: {first}")
    from scipy.stats import hmean

    rng = np.random.default_rng(seed)
    picks = {s: rng.integers(0, n, size=(samples, n)) for s, n in first.items()}
    out = {}
    for run, c in contributions.items():
        parts = np.concatenate([c[s][picks[s]].mean(axis=1) for s in UTILITY_SETS], axis=1)  # [samples, 9]
        utility = np.zeros(samples)
        positive = parts.min(axis=1) > 0  # 0 when a part is 0, as model_utility
        utility[positive] = hmean(parts[positive], axis=1)
        out[run] = utility
    return out


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap values (percentile method)."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)


MIN_K = 0.4  # open-unlearning's mia_min_k


def min_k_score(token_logprobs: Sequence[float], k: float = MIN_K) -> float:
    """Min-K% score of one example: minus the mean of its ``max(1, int(k * n))`` lowest token
    log-probabilities (0 for no tokens). The caller leaves out the last scored token."""
    lp = np.sort(np.asarray(token_logprobs, dtype=np.float32))
    if lp.size == 0:
        return 0.0
    num_k = max(1, int(len(lp) * k))
    return float(-np.mean(lp[:num_k]))


def extraction_strength(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """``1 - k / n`` with ``k`` the smallest index from which every teacher-forced greedy
    prediction equals its label; when none does (not even the last), ``k = n - 1``, as
    open-unlearning's loop leaves it, so the score is never below ``1 / n``. 0 for no tokens."""
    match = np.asarray(predictions) == np.asarray(labels)
    n = len(match)
    if n == 0:
        return 0.0
    suffix_ok = np.flip(np.cumprod(np.flip(match))).astype(bool)  # suffix_ok[k] = all(match[k:])
    k = int(np.argmax(suffix_ok)) if suffix_ok.any() else n - 1
    return 1.0 - k / n


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve of ``scores`` for the positive ``labels == 1`` (ties count one
    half): the Mann-Whitney statistic, equal to ``sklearn.metrics.roc_auc_score``."""
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both classes")
    ranks = rankdata(s)  # average ranks of ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """AUC of Min-K% scores, forget examples labelled 0 and holdout examples 1."""
    labels = [0] * len(forget_scores) + [1] * len(holdout_scores)
    return roc_auc(labels, list(forget_scores) + list(holdout_scores))


def privleak(auc: float, ref_auc: float | None = None) -> float:
    """``((1 - AUC) - (1 - AUC_ref)) / ((1 - AUC_ref) + 1e-10) * 100``; ``AUC_ref`` is the retain
    model's AUC, 0.5 without it."""
    ref = 0.5 if ref_auc is None else ref_auc
    score, ref = 1 - auc, 1 - ref
    return float((score - ref) / (ref + EPS) * 100)
