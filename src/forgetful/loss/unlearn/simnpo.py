"""SimNPO (Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization"), as
open-unlearning's ``SimNPO`` trainer and ``configs/trainer/SimNPO.yaml`` define it: NPO without a
reference, on the length-normalised NLL, with a margin ``delta``. With ``S_θ(x_i)`` the summed NLL
of forget row ``i`` and ``|y_i|`` its trained tokens:
``loss = gamma * mean_i -(2 / beta) log sigmoid(beta (S_θ(x_i) / |y_i| - delta)) + alpha R``
(open-unlearning's ``delta`` is the paper's margin ``gamma`` divided by ``beta``). Defaults:
open-unlearning's (beta 4.5, delta 0, gamma 0.125, alpha 1, NLL retain loss; from the paper's TOFU
configuration).

``delta="fitted"`` sets the margin to the model's own mean forget NLL per token before unlearning
(the mean over forget rows of ``S(x_i) / |y_i|``, computed once when the trainer is built), so that
the loss starts at the steep middle of its sigmoid whatever the model's NLL scale: at delta 0 a
model that knows the forget answers well (a low NLL per token) sits where the forget weight
``2 (1 - sigmoid(beta NLL / |y|))`` is already small."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LOSS_OPTION_DEFAULTS, UnlearningMethod


def simnpo_loss(nll: torch.Tensor, tokens: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """``mean_i -(2 / beta) * log sigmoid(beta * (nll_i / tokens_i - delta))``: NPO's loss on the
    length-normalised NLL, with no reference (a row without trained tokens counts one token)."""
    return (-2.0 / beta * F.logsigmoid(beta * (nll / tokens.clamp(min=1) - delta))).mean()


class SimNPO(UnlearningMethod):
    """SimNPO: NPO without a reference model, on the length-normalised NLL, with a margin ``delta``."""

    name = "simnpo"
    paper = "SimNPO (Fan et al. 2024, Simplicity Prevails: Rethinking Negative Preference Optimization)"
    defaults = {**LOSS_OPTION_DEFAULTS, "beta": 4.5, "gamma": 0.125}
    own_options = ("beta", "delta")

    def __init__(self, trainer):
        super().__init__(trainer)
        if self.args.delta == "fitted":
            self.delta = float(trainer.reference_nll(per_token=True).mean())
        else:
            self.delta = float(self.args.delta)

    def forget_loss(self, model, inputs):
        out = self.trainer.batch_nll(model, inputs["forget"])
        return simnpo_loss(out.sum_per_row(), out.count_per_row(), self.args.beta, self.delta)

    def state(self) -> dict:
        return {"delta": self.delta}
