"""The TOFU metrics (forgetful.tofu.metrics) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from forgetful.rouge import rouge_l_recall
from forgetful.tofu.metrics import (
    EPS,
    bootstrap_model_utility,
    extraction_strength,
    forget_quality,
    mia_auc,
    min_k_score,
    model_utility,
    normalised_probability,
    percentile_interval,
    privleak,
    probability,
    roc_auc,
    truth_ratio,
    truth_ratio_forget,
    truth_ratio_utility,
    utility_contributions,
)

LN2, LN4 = math.log(2.0), math.log(4.0)


# --------------------------------------------------------------------------------------------
# ROUGE-L recall
# --------------------------------------------------------------------------------------------


def test_rouge_l_recall_hand_computed_with_stemming():
    # rouge-score lowercases, keeps alphanumerics and Porter-stems tokens longer than 3 chars:
    # reference "The cat was running" -> [the, cat, was, run]; generation "a cat runs" -> [a, cat, run].
    # LCS = [cat, run] = 2 tokens; recall = 2 / 4 (without stemming it would be 1 / 4).
    assert rouge_l_recall(["a cat runs"], ["The cat was running"]) == [pytest.approx(0.5)]
    # "running"/"runs" both stem to "run"
    assert rouge_l_recall(["running"], ["run"]) == [pytest.approx(1.0)]
    assert rouge_l_recall(["runs"], ["running"]) == [pytest.approx(1.0)]


def test_rouge_l_recall_is_recall_not_precision_and_keeps_order():
    # generation [cat, run] against reference [the, cat, was, run]: recall 2/4, precision would be 1
    gens = ["cat running", "Paris", "", "fast the dog"]
    refs = ["The cat was running", "Paris is the capital of France", "anything here", "the dog was fast"]
    # 3: ref [the, dog, was, fast], gen [fast, the, dog]: LCS [the, dog] = 2 -> 2/4
    expected = [2 / 4, 1 / 6, 0.0, 2 / 4]
    assert rouge_l_recall(gens, refs) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Probabilities and truth ratios
# --------------------------------------------------------------------------------------------


def test_probability_is_exp_minus_average_nll():
    np.testing.assert_allclose(probability(np.array([0.0, LN2, LN4])), [1.0, 0.5, 0.25], rtol=1e-12)
    assert probability([LN2]).dtype == np.float64


def test_normalised_probability_hand_computed():
    true_nll = np.array([LN2, 0.0])
    pert_nll = np.array([[LN4, LN4, LN4], [LN2, LN2, LN4]])
    # row 0: 0.5 / (0.5 + 0.75); row 1: 1 / (1 + 0.5 + 0.5 + 0.25)
    expected = np.array([0.5 / (0.5 + 0.75 + EPS), 1.0 / (1.0 + 1.25 + EPS)])
    got = normalised_probability(true_nll, pert_nll)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(got, [0.4, 1 / 2.25], rtol=1e-9)
    assert EPS == 1e-10
    # with every probability ~0 the eps keeps it finite
    assert np.isfinite(normalised_probability(np.array([1e4]), np.array([[1e4, 1e4]]))).all()


def test_truth_ratio_hand_computed():
    # correct p = 0.5; perturbed p = 0.25, 0.25, 1 -> geomean = 0.0625 ** (1/3)
    correct = np.array([LN2])
    pert = np.array([[LN4, LN4, 0.0]])
    geomean = (0.25 * 0.25 * 1.0) ** (1 / 3)
    np.testing.assert_allclose(truth_ratio(correct, pert), [geomean / 0.5], rtol=1e-9)
    np.testing.assert_allclose(truth_ratio(correct, pert), [math.exp(LN2 - 2 * LN4 / 3)], rtol=1e-9)


def test_truth_ratio_is_exp_of_nll_difference_per_row():
    rng = np.random.default_rng(0)
    correct = rng.uniform(0.1, 4.0, size=7)
    pert = rng.uniform(0.1, 4.0, size=(7, 5))
    np.testing.assert_allclose(truth_ratio(correct, pert), np.exp(correct - pert.mean(-1)), rtol=1e-8)
    # equal likelihoods -> R = 1
    np.testing.assert_allclose(truth_ratio(np.full(3, 1.3), np.full((3, 5), 1.3)), 1.0, rtol=1e-8)


def test_truth_ratio_forget_mean_of_min_r_and_inverse():
    # min(R, 1/R) = 0.5, 0.5, 1 -> mean 2/3
    assert truth_ratio_forget(np.array([0.5, 2.0, 1.0])) == pytest.approx(2 / 3, rel=1e-8)
    assert truth_ratio_forget([0.25]) == pytest.approx(0.25, rel=1e-8)
    assert truth_ratio_forget([4.0]) == pytest.approx(0.25, rel=1e-8)
    # the epsilons exactly: R = wrong / (correct + 1e-10), then min(R, 1 / (R + 1e-10))
    assert truth_ratio_forget([4.0]) == 1.0 / (4.0 + 1e-10)
    assert truth_ratio_forget([0.0]) == 0.0  # a zero ratio stays 0 (1 / 1e-10 is larger)
    assert truth_ratio_forget([1e-12]) == 1e-12


def test_truth_ratio_epsilon_in_the_denominator():
    # p_correct = exp(-800) underflows to 0: R = p_wrong / 1e-10, finite
    r = truth_ratio(np.array([800.0]), np.array([[LN2, LN2]]))
    assert r[0] == pytest.approx(0.5 / 1e-10)
    assert truth_ratio_utility(r) == 0.0 and truth_ratio_forget(r) == pytest.approx(1 / (0.5e10 + 1e-10))


def test_truth_ratio_utility_mean_of_clipped_one_minus_r():
    # max(0, 1 - R) = 0.5, 0, 0.75 -> mean 1.25 / 3
    assert truth_ratio_utility(np.array([0.5, 2.0, 0.25])) == pytest.approx(1.25 / 3, rel=1e-12)
    assert truth_ratio_utility([1.0, 3.0]) == 0.0


# --------------------------------------------------------------------------------------------
# Forget quality and model utility
# --------------------------------------------------------------------------------------------


def test_forget_quality_identical_is_one():
    r = np.random.default_rng(0).lognormal(size=40)
    assert forget_quality(r, r) == pytest.approx(1.0)
    assert forget_quality(list(r), r.copy()) == pytest.approx(1.0)


def test_forget_quality_clearly_different_is_small_and_matches_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 1.0, 100), rng.normal(3.0, 1.0, 100)
    fq = forget_quality(a, b)
    assert fq < 0.01
    assert fq == pytest.approx(ks_2samp(a, b).pvalue)
    c, d = rng.normal(0.0, 1.0, 30), rng.normal(0.2, 1.0, 25)
    assert forget_quality(c, d) == pytest.approx(ks_2samp(c, d).pvalue)
    assert isinstance(fq, float)


def _utility_summary(values):
    it = iter(values)
    return {
        s: {m: next(it) for m in ("prob", "rouge", "truth_ratio")} for s in ("retain", "real_authors", "world_facts")
    }


def test_model_utility_harmonic_mean_of_nine():
    values = [0.9, 0.5, 0.3, 0.8, 0.6, 0.2, 0.7, 0.4, 0.1]
    summary = _utility_summary(values)
    summary["forget"] = {"prob": 0.0, "rouge": 0.0, "truth_ratio": 0.0}  # the forget set does not count
    expected = 9 / sum(1 / v for v in values)
    assert model_utility(summary) == pytest.approx(expected, rel=1e-12)
    assert model_utility(_utility_summary([0.5] * 9)) == pytest.approx(0.5)


def test_model_utility_zero_when_any_is_zero():
    values = [0.9, 0.5, 0.3, 0.8, 0.0, 0.2, 0.7, 0.4, 0.1]
    assert model_utility(_utility_summary(values)) == 0.0


def _utility_sets(rng, sizes=(40, 10, 12)) -> dict:
    """Per-example utility values of one run: probabilities, ROUGE and truth ratios in (0, 1)."""
    return {
        s: {k: rng.uniform(0.05, 0.95, n).tolist() for k in ("prob", "rouge", "truth_ratio")}
        for s, n in zip(("retain", "real_authors", "world_facts"), sizes)
    }


def test_utility_contributions_average_to_the_nine_parts_of_model_utility():
    sets = _utility_sets(np.random.default_rng(0))
    sets["retain"]["truth_ratio"][0] = 1.7  # R > 1: contributes 0, not a negative value
    parts = utility_contributions(sets)
    summary = {
        s: {
            "prob": float(np.mean(sets[s]["prob"])),
            "rouge": float(np.mean(sets[s]["rouge"])),
            "truth_ratio": truth_ratio_utility(sets[s]["truth_ratio"]),
        }
        for s in parts
    }
    assert parts["retain"][0, 2] == 0.0 and parts["retain"].shape == (40, 3)
    nine = np.concatenate([parts[s].mean(0) for s in ("retain", "real_authors", "world_facts")])
    assert model_utility(summary) == pytest.approx(9 / np.sum(1 / nine), rel=1e-12)


def test_bootstrap_of_constant_values_is_the_model_utility_every_time():
    sets = {s: {k: [v] * n for k in ("prob", "rouge", "truth_ratio")} for s, n, v in
            (("retain", 30, 0.4), ("real_authors", 7, 0.6), ("world_facts", 9, 0.2))}  # fmt: skip
    # per set: probability v, ROUGE v, 1 - R = 1 - v
    expected = 9 / (2 / 0.4 + 1 / 0.6 + 2 / 0.6 + 1 / 0.4 + 2 / 0.2 + 1 / 0.8)
    mu = bootstrap_model_utility({"a": sets}, samples=50)["a"]
    assert mu.shape == (50,)
    np.testing.assert_allclose(mu, expected, rtol=1e-12)


def test_bootstrap_is_paired_across_runs():
    """Run b's every per-example part is half of run a's, so its utility is half on any set of
    questions: the paired ratio is 0.5 in every resample, though each run's own interval is wide."""
    a = _utility_sets(np.random.default_rng(1))
    b = {
        s: {
            "prob": [x / 2 for x in v["prob"]],
            "rouge": [x / 2 for x in v["rouge"]],
            "truth_ratio": [1 - (1 - r) / 2 for r in v["truth_ratio"]],  # max(0, 1 - R) halved
        }
        for s, v in a.items()
    }
    mu = bootstrap_model_utility({"a": a, "b": b}, samples=400, seed=3)
    np.testing.assert_allclose(mu["b"] / mu["a"], 0.5, rtol=1e-9)
    low, high = percentile_interval(mu["a"])
    assert high - low > 0.01  # the resamples differ
    # the point estimate lies inside its interval; another seed gives other resamples
    summary = {s: {"prob": np.mean(v["prob"]), "rouge": np.mean(v["rouge"]),
                   "truth_ratio": truth_ratio_utility(v["truth_ratio"])} for s, v in a.items()}  # fmt: skip
    assert low < model_utility(summary) < high
    assert not np.array_equal(bootstrap_model_utility({"a": a}, samples=400, seed=4)["a"], mu["a"])


def test_bootstrap_zero_part_and_its_errors():
    sets = _utility_sets(np.random.default_rng(2))
    sets["world_facts"]["rouge"] = [0.0] * 12  # a part that is 0 in every resample: utility 0, as model_utility
    assert not bootstrap_model_utility({"a": sets}, samples=20)["a"].any()
    other = _utility_sets(np.random.default_rng(2), sizes=(40, 10, 11))
    with pytest.raises(ValueError, match="different numbers of examples"):
        bootstrap_model_utility({"a": sets, "b": other})
    with pytest.raises(ValueError, match="a utility set has no examples"):
        bootstrap_model_utility({"a": _utility_sets(np.random.default_rng(2), sizes=(4, 0, 3))})
    assert bootstrap_model_utility({}) == {}


def test_percentile_interval_hand_computed():
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert percentile_interval(np.arange(101.0), level=0.5) == pytest.approx((25.0, 75.0))


# --------------------------------------------------------------------------------------------
# Min-K%, AUC, privleak, extraction strength
# --------------------------------------------------------------------------------------------


def test_min_k_score_hand_computed():
    # 5 tokens: num_k = max(1, int(5 * 0.4)) = 2 lowest log-probs: -3, -2 -> score 2.5
    assert min_k_score([-1.0, -3.0, -0.5, -2.0, -0.1]) == pytest.approx(2.5)
    # 2 tokens: int(0.8) = 0 -> at least 1: the lowest only
    assert min_k_score([-0.2, -4.0]) == pytest.approx(4.0)
    # 10 tokens, k = 0.4: the four lowest
    lp = -np.arange(1, 11, dtype=np.float64)
    assert min_k_score(lp) == pytest.approx((10 + 9 + 8 + 7) / 4)
    assert min_k_score(lp, k=0.2) == pytest.approx(9.5)
    assert min_k_score([]) == 0.0  # no tokens: 0, as open-unlearning returns


def test_extraction_strength_hand_computed():
    # all right: k = 0 -> 1
    assert extraction_strength([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    # right from index 2 on: k = 2 of 4 -> 0.5
    assert extraction_strength([9, 2, 3, 4], [1, 5, 3, 4]) == 0.5
    # a wrong token late resets the suffix: right only at the last -> k = 3 -> 0.25
    assert extraction_strength([1, 2, 9, 4], [1, 2, 3, 4]) == 0.25
    # nothing right: open-unlearning's loop leaves k = n - 1, so 1 / n, not 0
    assert extraction_strength([7, 7, 7, 7], [1, 2, 3, 4]) == 0.25
    assert extraction_strength([5], [6]) == 1.0  # one token, wrong: 1 - 0/1
    assert extraction_strength([], []) == 0.0


def _sklearn_like_auc(labels, scores):
    """P(positive score > negative score) + 0.5 P(tie), by brute force."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_roc_auc_hand_computed_with_ties():
    # positives 3, 2 vs negatives 1, 2: pairs (3>1) (3>2) (2>1) (2=2) -> 3.5 / 4
    assert roc_auc([1, 1, 0, 0], [3.0, 2.0, 1.0, 2.0]) == pytest.approx(0.875)
    assert roc_auc([0, 1], [1.0, 2.0]) == 1.0 and roc_auc([0, 1], [2.0, 1.0]) == 0.0
    assert roc_auc([0, 0, 1, 1], [1.0, 1.0, 1.0, 1.0]) == 0.5
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        s = rng.integers(0, 6, 40).astype(float)  # many ties
        assert roc_auc(y, s) == pytest.approx(_sklearn_like_auc(y, s), abs=1e-12)
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.1, 0.2])


def test_roc_auc_equals_the_mann_whitney_statistic():
    """sklearn's roc_auc_score (what open-unlearning calls) is U / (n0 * n1) with ties counted
    half; scipy's Mann-Whitney U is an independent implementation of the same number."""
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200), 1)  # ties
    u = mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert roc_auc(y, s) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()), abs=1e-12)


def test_mia_auc_labels_forget_0_holdout_1():
    # holdout scores (higher NLL: not seen) above every forget score -> AUC 1
    assert mia_auc([0.1, 0.2], [1.0, 2.0, 3.0]) == 1.0
    assert mia_auc([1.0, 2.0], [0.1, 0.2]) == 0.0
    assert mia_auc([1.0, 0.1], [0.5, 2.0]) == pytest.approx(0.75)  # 3 of 4 pairs


def test_privleak_hand_computed():
    # no retain model: reference AUC 0.5 -> ((1 - auc) - 0.5) / (0.5 + 1e-10) * 100
    assert privleak(0.9) == pytest.approx((0.1 - 0.5) / (0.5 + EPS) * 100)
    assert privleak(0.5) == 0.0
    assert privleak(0.2, ref_auc=0.6) == pytest.approx((0.8 - 0.4) / (0.4 + EPS) * 100)
    assert privleak(0.6, ref_auc=0.6) == 0.0
    assert privleak(1.0, ref_auc=1.0) == 0.0  # 0 / 1e-10
    assert privleak(0.0) == pytest.approx(100.0)
