"""The unlearning methods, one registry (name -> class), as open-unlearning's trainers define them
(``src/trainer/unlearn/{grad_ascent,grad_diff,npo,simnpo,rmu}.py`` and ``configs/trainer/*.yaml``).

A method is a small class registered with :func:`register_unlearning_method`; the
:class:`~forgetful.loss.unlearning.UnlearningTrainer` looks it up by name (:func:`unlearning_method`),
builds it once with itself, and asks it for the loss of every micro-batch (:meth:`UnlearningMethod.losses`).
With ``NLL(x)`` the mean cross-entropy over the trained tokens of a micro-batch (the HF model loss),
``S_θ(x_i)`` the summed NLL of row ``i`` and ``|y_i|`` its trained tokens:

* ``grad_ascent``: ``loss = -NLL_θ(forget)``;
* ``grad_diff``: ``loss = gamma * -NLL_θ(forget) + alpha * R``;
* ``npo`` (Zhang et al. 2024): ``gamma * mean_i -(2 / beta) log sigmoid(beta (S_θ(x_i) - S_ref(x_i))) + alpha R``,
  the reference being the model before unlearning (its ``S_ref`` computed once, before training);
* ``simnpo`` (Fan et al. 2024, "Simplicity Prevails"): NPO without a reference, on the
  length-normalised NLL: ``gamma * mean_i -(2 / beta) log sigmoid(beta (S_θ(x_i) / |y_i| - delta)) + alpha R``
  (open-unlearning's ``delta`` is the paper's margin ``gamma`` divided by ``beta``);
* ``rmu`` (Li et al. 2024, WMDP): in :mod:`.rmu`.

``R`` is the retain loss: ``NLL_θ(retain)`` (``retain_loss_type="NLL"``), or the KL divergence from
the reference model's next-token distribution over every position of the retain batch (``"KL"``,
``kl_div(..., reduction="batchmean", log_target=True)`` as open-unlearning sums it), or, for RMU,
the distance of the hidden states to the reference's (``"EMBED_DIFF"``).

Every NLL goes through the trainer's loss backend (``--loss_backend``: dense, chunked, cce, liger,
auto), which gives per-token values, hence per-row sums, on every backend. The KL retain loss needs
each position's whole next-token distribution, which a fused backend never forms: it always
computes dense logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ForgetfulError
from .unlearning_registry import (
    LOSS_OPTION_DEFAULTS,
    RETAIN_LOSS_TYPES,
    UNLEARNING_METHODS,
    UnlearningMethod,
    kl_to_reference,
    register_unlearning_method,
)


def unlearning_method(name: str) -> type[UnlearningMethod]:
    """The method registered as ``name`` (every method in this package is registered once this
    module is imported: RMU at its end)."""
    if name not in UNLEARNING_METHODS:
        raise ForgetfulError(f"unknown unlearning method '{name}'; choose from {', '.join(UNLEARNING_METHODS)}")
    return UNLEARNING_METHODS[name]


# ------------------------------------------------------------------------------------------------
# The losses
# ------------------------------------------------------------------------------------------------


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """``mean_i -(2 / beta) * log sigmoid(beta * (nll_i - ref_nll_i))`` over summed row NLLs."""
    return (-2.0 / beta * F.logsigmoid(beta * (nll - ref_nll))).mean()


def simnpo_loss(nll: torch.Tensor, tokens: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """``mean_i -(2 / beta) * log sigmoid(beta * (nll_i / tokens_i - delta))``: NPO's loss on the
    length-normalised NLL, with no reference (a row without trained tokens counts one token)."""
    return (-2.0 / beta * F.logsigmoid(beta * (nll / tokens.clamp(min=1) - delta))).mean()


# ------------------------------------------------------------------------------------------------
# The methods on token likelihoods
# ------------------------------------------------------------------------------------------------


@register_unlearning_method("grad_ascent")
class GradAscent(UnlearningMethod):
    """Gradient ascent on the forget set: ``loss = -NLL_θ(forget)`` (no retain set)."""

    paper = "gradient ascent (Jang et al. 2023)"
    uses_retain = False

    def forget_loss(self, model, inputs):
        return -self.trainer.batch_nll(model, inputs["forget"], summed=True).mean()


@register_unlearning_method("grad_diff")
class GradDiff(GradAscent):
    """Gradient difference: ascent on the forget set, descent on the retain set."""

    paper = "gradient difference (Liu et al. 2022)"
    uses_retain = True


@register_unlearning_method("npo", beta=0.1)
class NPO(UnlearningMethod):
    """Negative preference optimisation against the model before unlearning."""

    paper = "NPO (Zhang et al. 2024, Negative Preference Optimization)"
    needs_reference_nll = True
    own_options = ("beta",)

    def forget_loss(self, model, inputs):
        nll = self.trainer.batch_nll(model, inputs["forget"]).sum_per_row()
        ref = self.trainer.ref_nll.to(nll.device)[inputs["forget_index"].to(nll.device)]
        return npo_loss(nll, ref, self.args.beta)


@register_unlearning_method("simnpo", beta=4.5, gamma=0.125)
class SimNPO(UnlearningMethod):
    """SimNPO: NPO without a reference model, on the length-normalised NLL, with a margin ``delta``.
    Defaults: open-unlearning's (beta 4.5, delta 0, gamma 0.125, alpha 1, NLL retain loss; from
    the paper's TOFU configuration)."""

    paper = "SimNPO (Fan et al. 2024, Simplicity Prevails: Rethinking Negative Preference Optimization)"
    own_options = ("beta", "delta")

    def forget_loss(self, model, inputs):
        out = self.trainer.batch_nll(model, inputs["forget"])
        return simnpo_loss(out.sum_per_row(), out.count_per_row(), self.args.beta, self.args.delta)


__all__ = [
    "LOSS_OPTION_DEFAULTS",
    "RETAIN_LOSS_TYPES",
    "UNLEARNING_METHODS",
    "GradAscent",
    "GradDiff",
    "NPO",
    "RMU",
    "SimNPO",
    "UnlearningMethod",
    "kl_to_reference",
    "npo_loss",
    "register_unlearning_method",
    "simnpo_loss",
    "unlearning_method",
]

# RMU lives in its own module (it needs the decoder stack) and is registered here, after the methods
# above: whichever module is imported first, the registry then lists every method in the same order
from .rmu import RMU  # noqa: E402

register_unlearning_method("rmu", retain_loss_type="EMBED_DIFF")(RMU)
