"""gradient_cosine: the agreement of a gradient with its reference, as the loss-backend benchmark
reports it (values against a manual computation, its edge cases, the slices it sums over)."""

from __future__ import annotations

import math

import pytest
import torch

import forgetful.measure as measure
from forgetful.errors import ForgetfulError
from forgetful.measure import gradient_cosine


def test_matches_the_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 50, generator=g), torch.randn(150, generator=g)
    x, y = a.double().flatten(), b.double()
    expected = float(x @ y / (x.norm() * y.norm()))
    assert gradient_cosine(a, b) == pytest.approx(expected, abs=1e-14)
    assert gradient_cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert gradient_cosine(torch.tensor([2.0, -1.0]), torch.tensor([-4.0, 2.0])) == pytest.approx(-1.0)


def test_identical_tensors_give_exactly_one_in_any_dtype():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        t = (torch.randn(1000, generator=g) * 1e-3).to(dtype)
        assert gradient_cosine(t, t.clone()) == 1.0


def test_scale_does_not_matter_and_a_perturbation_lowers_it():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(4096, generator=g)
    assert gradient_cosine(ref * 7.5, ref) == pytest.approx(1.0, abs=1e-12)
    noisy = ref + 0.1 * torch.randn(4096, generator=g)
    # cos = 1 / sqrt(1 + 0.1^2) for independent noise of a tenth of the reference's scale
    assert gradient_cosine(noisy, ref) == pytest.approx(1 / math.sqrt(1.01), abs=2e-3)


def test_zero_tensors():
    z, v = torch.zeros(5), torch.arange(5.0)
    assert gradient_cosine(z, z) == 1.0
    assert gradient_cosine(z, v) == 0.0 and gradient_cosine(v, z) == 0.0


def test_sums_slice_by_slice_to_the_same_value(monkeypatch):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1001, generator=g), torch.randn(1001, generator=g)
    whole = gradient_cosine(a, b)
    monkeypatch.setattr(measure, "COSINE_SLICE", 64)  # 16 slices, the last one short
    assert gradient_cosine(a, b) == pytest.approx(whole, abs=1e-14)


def test_a_different_number_of_elements_is_refused():
    with pytest.raises(ForgetfulError, match="6 elements against a reference of 5"):
        gradient_cosine(torch.ones(2, 3), torch.ones(5))
