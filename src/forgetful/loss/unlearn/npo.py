"""NPO (Zhang et al. 2024, "Negative Preference Optimization"), as open-unlearning's ``NPO`` trainer
and ``configs/trainer/NPO.yaml`` define it: with ``S_θ(x_i)`` the summed NLL of forget row ``i``,
``loss = gamma * mean_i -(2 / beta) log sigmoid(beta (S_θ(x_i) - S_ref(x_i))) + alpha R``, the
reference being the model before unlearning (its ``S_ref`` computed once, before training);
beta 0.1, alpha = gamma = 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LOSS_OPTION_DEFAULTS, UnlearningMethod


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """``mean_i -(2 / beta) * log sigmoid(beta * (nll_i - ref_nll_i))`` over summed row NLLs."""
    return (-2.0 / beta * F.logsigmoid(beta * (nll - ref_nll))).mean()


class NPO(UnlearningMethod):
    """Negative preference optimisation against the model before unlearning."""

    name = "npo"
    paper = "NPO (Zhang et al. 2024, Negative Preference Optimization)"
    defaults = {**LOSS_OPTION_DEFAULTS, "beta": 0.1}
    needs_reference_nll = True
    own_options = ("beta",)

    def forget_loss(self, model, inputs):
        nll = self.trainer.batch_nll(model, inputs["forget"]).sum_per_row()
        ref = self.trainer.ref_nll.to(nll.device)[inputs["forget_index"].to(nll.device)]
        return npo_loss(nll, ref, self.args.beta)
