"""Gradient ascent (open-unlearning's ``GradAscent``): ``loss = -NLL_θ(forget)``, no retain set."""

from __future__ import annotations

from .base import UnlearningMethod


class GradAscent(UnlearningMethod):
    """Gradient ascent on the forget set: ``loss = -NLL_θ(forget)`` (no retain set)."""

    name = "grad_ascent"
    paper = "gradient ascent (Jang et al. 2023)"
    uses_retain = False

    def forget_loss(self, model, inputs):
        return -self.trainer.batch_nll(model, inputs["forget"], summed=True).mean()
