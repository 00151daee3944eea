"""What every unlearning method shares: the base class :class:`UnlearningMethod` (built once with
its trainer, then asked for the loss of every micro-batch), the loss options every method reads
with their defaults, and the retain losses (``NLL`` through the trainer's loss backend, ``KL`` to
the reference model: :func:`kl_to_reference`).

With ``NLL(x)`` the mean cross-entropy over the trained tokens of a micro-batch (the HF model
loss), a method's loss is ``gamma * forget_loss + alpha * R`` (``R`` the retain loss), or the forget
loss alone for a method without a retain set. ``R`` is ``NLL_θ(retain)`` (``retain_loss_type="NLL"``),
or the KL divergence from the reference model's next-token distribution over every position of the
retain batch (``"KL"``, ``kl_div(..., reduction="batchmean", log_target=True)`` as open-unlearning
sums it), or, for RMU, the distance of the hidden states to the reference's (``"EMBED_DIFF"``).

Every NLL goes through the trainer's loss backend (``--loss_backend``: dense, chunked, cce, liger,
auto), which gives per-token values, hence per-row sums, on every backend. The KL retain loss needs
each position's whole next-token distribution, which a fused backend never forms: it always
computes dense logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the options every method reads, with their values when neither the user nor the method sets one
LOSS_OPTION_DEFAULTS = {"beta": 0.1, "gamma": 1.0, "retain_loss_type": "NLL"}
RETAIN_LOSS_TYPES = ("NLL", "KL", "EMBED_DIFF")


class UnlearningMethod:
    """One unlearning method: built once with its trainer (where it prepares what it needs), then
    :meth:`losses` for every micro-batch. Subclasses set :attr:`name`, :meth:`forget_loss` and their
    :attr:`defaults`, and may replace :meth:`retain_loss`."""

    #: the name the registry (:data:`forgetful.loss.unlearn.UNLEARNING_METHODS`) knows it by
    name: str = ""
    #: the paper, for help texts and reports
    paper: str = ""
    #: the loss options this method reads, with its own defaults (open-unlearning's configs)
    defaults: dict = LOSS_OPTION_DEFAULTS
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
        return self.trainer.batch_nll(model, retain, summed=True).mean()

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


def kl_to_reference(model, ref_model, part: dict) -> torch.Tensor:
    """``kl_div(log p_θ, log p_ref, reduction="batchmean", log_target=True)`` over every position
    of the batch, padding included, as open-unlearning computes its KL retain loss."""
    kwargs = {"input_ids": part["input_ids"], "attention_mask": part.get("attention_mask"), "use_cache": False}
    with torch.no_grad():
        ref = F.log_softmax(ref_model(**kwargs).logits.float(), dim=-1)
    cur = F.log_softmax(model(**kwargs).logits.float(), dim=-1)
    vocab = cur.shape[-1]
    return F.kl_div(cur.reshape(-1, vocab), ref.reshape(-1, vocab), reduction="batchmean", log_target=True)
