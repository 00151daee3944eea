"""The TOFU metrics (forgetful.tofu.metrics) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from forgetful.tofu.metrics import (
    EPS,
    forget_quality,
    model_utility,
    normalised_probability,
    probability,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_forget,
    truth_ratio_utility,
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
