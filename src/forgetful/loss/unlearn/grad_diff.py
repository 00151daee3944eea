"""Gradient difference (open-unlearning's ``GradDiff``): ``loss = gamma * -NLL_θ(forget) + alpha * R``."""

from __future__ import annotations

from .grad_ascent import GradAscent


class GradDiff(GradAscent):
    """Gradient difference: ascent on the forget set, descent on the retain set."""

    name = "grad_diff"
    paper = "gradient difference (Liu et al. 2022)"
    uses_retain = True
