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

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ForgetfulError

#: the options every method reads, with their values when neither the user nor the method sets one
LOSS_OPTION_DEFAULTS = {"beta": 0.1, "gamma": 1.0, "retain_loss_type": "NLL"}
RETAIN_LOSS_TYPES = ("NLL", "KL", "EMBED_DIFF")


class UnlearningMethod:
    """One unlearning method: built once with its trainer (where it prepares what it needs), then
    :meth:`losses` for every micro-batch. Subclasses set :meth:`forget_loss`, and may replace
    :meth:`retain_loss`."""

    name: str = ""
    #: the paper, for help texts and reports
    paper: str = ""
    #: the loss options this method reads, with its own defaults (open-unlearning's configs)
    defaults: dict = {}
    uses_retain: bool = True
    #: computes the summed NLL of every forget row under the model before training (NPO)
    needs_reference_nll: bool = False
    #: the retain loss types it accepts
    retain_loss_types: tuple[str, ...] = ("NLL", "KL")
    #: the loss options it reads besides alpha, gamma and retain_loss_type (read where it uses the retain set)
    own_options: tuple[str, ...] = ()

    def __init__(self, trainer):
        """``trainer``: the :class:`~forgetful.loss.unlearning.UnlearningTrainer` it serves (its args,
        loss backend, reference model and reference NLL)."""
        self.trainer = trainer
        self.args = trainer.args

    @classmethod
    def options_of(cls, args) -> dict:
        """The loss options this method reads and their values in ``args`` (what results record per run)."""
        names = (("alpha", "gamma", "retain_loss_type") if cls.uses_retain else ()) + cls.own_options
        return {name: getattr(args, name) for name in names}

    def needs_reference_model(self) -> bool:
        """Whether the trainer keeps a frozen copy of the model before unlearning."""
        return self.uses_retain and self.args.retain_loss_type in ("KL", "EMBED_DIFF")

    def forget_loss(self, model, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    def retain_loss(self, model, retain: dict) -> torch.Tensor:
        if self.args.retain_loss_type == "KL":
            return kl_to_reference(model, self.trainer.ref_model, retain)
        return self.trainer.batch_nll(model, retain).mean()

    def losses(self, model, inputs: dict) -> dict[str, torch.Tensor]:
        """The loss of one micro-batch (``loss``) and its parts."""
        parts = {"forget_loss": self.forget_loss(model, inputs)}
        if not self.uses_retain:
            parts["loss"] = parts["forget_loss"]
            return parts
        parts["retain_loss"] = self.retain_loss(model, inputs["retain"])
        parts["loss"] = self.args.gamma * parts["forget_loss"] + self.args.alpha * parts["retain_loss"]
        return parts

    def state(self) -> dict:
        """What the results record about the method beyond its options (JSON-ready)."""
        return {}

    def save(self, folder) -> None:
        """Write what the unlearned model needs beside it (nothing, for most methods)."""


UNLEARNING_METHODS: dict[str, type[UnlearningMethod]] = {}


def register_unlearning_method(name: str, **defaults) -> Callable[[type[UnlearningMethod]], type[UnlearningMethod]]:
    """Class decorator: make a method available by ``name``, with its own ``defaults`` for the loss
    options (the others take :data:`LOSS_OPTION_DEFAULTS`)."""

    def deco(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
        cls.name = name
        cls.defaults = {**LOSS_OPTION_DEFAULTS, **defaults}
        UNLEARNING_METHODS[name] = cls
        return cls

    return deco


def unlearning_method(name: str) -> type[UnlearningMethod]:
    """The method registered as ``name``."""
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


def kl_to_reference(model, ref_model, part: dict) -> torch.Tensor:
    """``kl_div(log p_θ, log p_ref, reduction="batchmean", log_target=True)`` over every position
    of the batch, padding included, as open-unlearning computes its KL retain loss."""
    kwargs = {"input_ids": part["input_ids"], "attention_mask": part.get("attention_mask"), "use_cache": False}
    with torch.no_grad():
        ref = F.log_softmax(ref_model(**kwargs).logits.float(), dim=-1)
    cur = F.log_softmax(model(**kwargs).logits.float(), dim=-1)
    vocab = cur.shape[-1]
    return F.kl_div(cur.reshape(-1, vocab), ref.reshape(-1, vocab), reduction="batchmean", log_target=True)


# ------------------------------------------------------------------------------------------------
# The methods on token likelihoods
# ------------------------------------------------------------------------------------------------


@register_unlearning_method("grad_ascent")
class GradAscent(UnlearningMethod):
    """Gradient ascent on the forget set: ``loss = -NLL_θ(forget)`` (no retain set)."""

    paper = "gradient ascent (Jang et al. 2023)"
    uses_retain = False

    def forget_loss(self, model, inputs):
        return -self.trainer.batch_nll(model, inputs["forget"]).mean()


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
    "SimNPO",
    "UnlearningMethod",
    "kl_to_reference",
    "npo_loss",
    "register_unlearning_method",
    "simnpo_loss",
    "unlearning_method",
]

# RMU lives in its own module (it needs the decoder stack); importing it here registers it wherever the
# registry is imported, whatever the import order
from . import rmu  # noqa: E402, F401
