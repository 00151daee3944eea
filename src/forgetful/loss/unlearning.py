"""Post-hoc unlearning on the selective-loss trainer stack: gradient ascent, gradient difference
and NPO, as open-unlearning's trainers define them (``src/trainer/unlearn/{grad_ascent,grad_diff,
npo}.py``, ``configs/trainer/{GradAscent,GradDiff,NPO}.yaml``).

Each step reads a micro-batch of forget rows and, for ``grad_diff`` and ``npo``, as many retain
rows, each drawn uniformly at random when its forget row is read (open-unlearning's
``ForgetRetainDataset``, anchored on the forget set: an epoch is one pass over the forget rows).
With ``NLL(x)`` the mean cross-entropy over the trained tokens of a micro-batch (the HF model loss)
and ``S_θ(x_i)`` the summed NLL of row ``i``:

* ``grad_ascent``: ``loss = -NLL_θ(forget)``;
* ``grad_diff``: ``loss = gamma * -NLL_θ(forget) + alpha * R``;
* ``npo``: ``loss = gamma * mean_i -(2 / beta) * log sigmoid(beta * (S_θ(x_i) - S_ref(x_i))) + alpha * R``,
  the reference being the model before unlearning; its ``S_ref`` is computed once, before training
  (identical model and reference give ``gamma * (2 / beta) * log 2 + alpha * R``);

with ``R`` the retain loss: ``NLL_θ(retain)`` (``retain_loss_type="NLL"``, the default) or the KL
divergence from the reference model's next-token distribution over every position of the retain
batch (``"KL"``, ``kl_div(..., reduction="batchmean", log_target=True)`` as open-unlearning sums it).
Micro-batch losses are averaged over the gradient-accumulation steps, as the HF Trainer that
open-unlearning runs does. Defaults: open-unlearning's TOFU unlearning recipe (lr 1e-5, 10 epochs,
effective batch 32, weight decay 0.01, one warmup epoch; beta 0.1, alpha = gamma = 1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset as TorchDataset

from ..errors import ForgetfulError
from ..nll import token_nll
from ..tokens import pad_token_id
from .trainer import SelectiveLossCollator, SelectiveLossConfig, SelectiveLossTrainer, validate_loss_masks

UNLEARNING_METHODS = ("grad_ascent", "grad_diff", "npo")
RETAIN_LOSS_TYPES = ("NLL", "KL")


@dataclass
class OpenUnlearningRecipe(SelectiveLossConfig):
    """open-unlearning's TOFU training recipe as option defaults, declared once for finetuning
    (``tofu-experiment``) and unlearning (``unlearn``): lr 1e-5, 8 rows per device x 4 accumulation
    steps (effective 32 on one GPU), weight decay 0.01, one warm-up epoch, linear decay, AdamW, the
    mean loss of each micro-batch, 5 epochs (unlearning: 10)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (open-unlearning: 1e-5)."})
    num_train_epochs: float = field(
        default=5.0,
        metadata={"help": "Epochs (open-unlearning: 5 to finetune, 10 to unlearn).", "aliases": ["--epochs"]},
    )
    per_device_train_batch_size: int = field(
        default=8,
        metadata={
            "help": "Rows per process per micro-batch (open-unlearning: 8).",
            "aliases": ["--batch_size", "--batch-size"],
        },
    )
    gradient_accumulation_steps: int = field(
        default=4, metadata={"help": "Micro-batches per optimizer step (open-unlearning: 4)."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (open-unlearning: 0.01)."})
    warmup_epochs: float | None = field(
        default=1.0, metadata={"help": "Epochs of learning-rate warm-up (open-unlearning: 1)."}
    )
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "Learning-rate schedule after the warm-up (open-unlearning: linear)."}
    )
    loss_average: str = field(
        default="micro_batch",
        metadata={
            "help": "micro_batch: the mean loss of each micro-batch (open-unlearning's); tokens: over all tokens of a step."
        },
    )
    save_strategy: str = field(default="no", metadata={"help": "When to checkpoint: no, steps or epoch."})
    logging_steps: float = field(default=25, metadata={"help": "Log the losses every N steps."})


@dataclass
class UnlearningLossOptions:
    """The weights of GradDiff's and NPO's losses (open-unlearning's defaults), declared once for
    ``unlearn`` and ``tofu-experiment``."""

    beta: float = field(default=0.1, metadata={"help": "NPO: inverse temperature."})
    alpha: float = field(default=1.0, metadata={"help": "grad_diff, npo: weight of the retain loss."})
    gamma: float = field(default=1.0, metadata={"help": "grad_diff, npo: weight of the forget loss."})
    retain_loss_type: str = field(default="NLL", metadata={"help": "grad_diff, npo: NLL or KL (to the reference)."})

    def check_loss_options(self) -> None:
        if self.retain_loss_type not in RETAIN_LOSS_TYPES:
            raise ForgetfulError(
                f"retain_loss_type must be one of {', '.join(RETAIN_LOSS_TYPES)}, got '{self.retain_loss_type}'"
            )
        if self.beta <= 0:
            raise ForgetfulError(f"beta must be positive, got {self.beta}")


@dataclass
class UnlearningConfig(OpenUnlearningRecipe, UnlearningLossOptions):
    """The unlearning method and its weights on open-unlearning's TOFU unlearning recipe."""

    method: str = field(default="npo", metadata={"help": f"Unlearning method: {', '.join(UNLEARNING_METHODS)}."})
    num_train_epochs: float = field(
        default=10.0, metadata={"help": "Epochs over the forget set (open-unlearning: 10).", "aliases": ["--epochs"]}
    )
    logging_steps: float = field(default=5, metadata={"help": "Log the losses every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the forget and retain rows travel in extra columns."}
    )

    RECIPE = (*SelectiveLossConfig.RECIPE, "method", "beta", "alpha", "gamma", "retain_loss_type")

    def __post_init__(self):
        if self.method not in UNLEARNING_METHODS:
            raise ForgetfulError(
                f"unknown unlearning method '{self.method}'; choose from {', '.join(UNLEARNING_METHODS)}"
            )
        self.check_loss_options()
        super().__post_init__()

    @property
    def uses_retain(self) -> bool:
        return self.method != "grad_ascent"


class ForgetRetainDataset(TorchDataset):
    """Item ``i``: forget row ``i`` and a retain row drawn uniformly at random (torch's global
    generator, which the Trainer seeds) each time it is read; one epoch = one pass over the
    forget rows."""

    def __init__(self, forget, retain=None):
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict:
        item = {"forget": self.forget[int(i)], "forget_index": int(i)}
        if self.retain is not None:
            item["retain"] = self.retain[int(torch.randint(0, len(self.retain), (1,)).item())]
        return item


class ForgetRetainCollator:
    """Pads the forget and the retain rows apart (:class:`SelectiveLossCollator`)."""

    def __init__(self, pad_token_id: int):
        self.inner = SelectiveLossCollator(pad_token_id)

    def __call__(self, items: list[dict]) -> dict:
        batch = {
            "forget": self.inner([it["forget"] for it in items]),
            "forget_index": torch.tensor([it["forget_index"] for it in items]),
        }
        if "retain" in items[0]:
            batch["retain"] = self.inner([it["retain"] for it in items])
        return batch


def mean_nll(model, part: dict) -> torch.Tensor:
    """The HF model loss: mean cross-entropy over the trained tokens of the micro-batch."""
    out = token_nll(model, part["input_ids"], part["labels"], attention_mask=part.get("attention_mask"))
    return out.nll.sum() / max(out.nll.numel(), 1)


def sequence_nll(model, part: dict) -> torch.Tensor:
    """Per row: the summed NLL of its trained tokens (open-unlearning's ``compute_batch_nll``)."""
    out = token_nll(model, part["input_ids"], part["labels"], attention_mask=part.get("attention_mask"))
    return out.sum_per_row()


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """``mean_i -(2 / beta) * log sigmoid(beta * (nll_i - ref_nll_i))`` over summed row NLLs."""
    return (-2.0 / beta * F.logsigmoid(beta * (nll - ref_nll))).mean()


def kl_to_reference(model, ref_model, part: dict) -> torch.Tensor:
    """``kl_div(log p_θ, log p_ref, reduction="batchmean", log_target=True)`` over every position
    of the batch, padding included, as open-unlearning computes its KL retain loss."""
    kwargs = {"input_ids": part["input_ids"], "attention_mask": part.get("attention_mask"), "use_cache": False}
    with torch.no_grad():
        ref = F.log_softmax(ref_model(**kwargs).logits.float(), dim=-1)
    cur = F.log_softmax(model(**kwargs).logits.float(), dim=-1)
    vocab = cur.shape[-1]
    return F.kl_div(cur.reshape(-1, vocab), ref.reshape(-1, vocab), reduction="batchmean", log_target=True)


class UnlearningTrainer(SelectiveLossTrainer):
    """Unlearn ``forget_dataset`` (rows of ``input_ids``, ``attention_mask``, ``loss_mask``) by
    ``args.method``, keeping ``retain_dataset`` (``grad_diff``, ``npo``). For ``npo`` the
    reference NLL of every forget row is computed by the model as it is now (before training),
    unless ``ref_nll`` gives it."""

    loss_is_scaled_for_ga = False  # micro-batch losses; the Trainer divides by the accumulation steps

    def __init__(
        self,
        model=None,
        args: UnlearningConfig | None = None,
        *,
        forget_dataset=None,
        retain_dataset=None,
        ref_nll: np.ndarray | torch.Tensor | None = None,
        processing_class=None,
        **kwargs,
    ):
        if not isinstance(args, UnlearningConfig):
            raise ForgetfulError("UnlearningTrainer needs args (an UnlearningConfig)")
        if forget_dataset is None or len(forget_dataset) == 0:
            raise ForgetfulError("unlearning needs a non-empty forget dataset")
        if args.uses_retain and (retain_dataset is None or len(retain_dataset) == 0):
            raise ForgetfulError(f"unlearning method '{args.method}' needs a non-empty retain dataset")
        self.forget_dataset = forget_dataset
        self.retain_dataset = retain_dataset if args.uses_retain else None
        pad = pad_token_id(processing_class, model)
        super().__init__(
            model=model,
            args=args,
            data_collator=ForgetRetainCollator(pad),
            train_dataset=ForgetRetainDataset(forget_dataset, self.retain_dataset),
            processing_class=processing_class,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False
        self.ref_model = None
        if args.uses_retain and args.retain_loss_type == "KL":
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False).to(self.args.device)
        self.ref_nll = None
        if args.method == "npo":
            if ref_nll is None:
                ref_nll = self.reference_nll()
            self.ref_nll = torch.as_tensor(np.asarray(ref_nll), dtype=torch.float32)
            if len(self.ref_nll) != len(forget_dataset):
                raise ForgetfulError(f"ref_nll has {len(self.ref_nll)} values for {len(forget_dataset)} forget rows")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for col in ("forget", "retain", "forget_index"):
            if col not in self._signature_columns:
                self._signature_columns.append(col)

    def _validate_datasets(self, train_dataset, eval_dataset) -> None:
        validate_loss_masks(self.forget_dataset, "forget_dataset")
        if self.retain_dataset is not None:
            validate_loss_masks(self.retain_dataset, "retain_dataset")

    @torch.no_grad()
    def reference_nll(self, batch_size: int | None = None) -> np.ndarray:
        """Summed NLL of every forget row under the current model (the NPO reference), in the
        training precision."""
        model = self.model.to(self.args.device)
        was_training = model.training
        model.eval()
        bs = batch_size or self.args.per_device_eval_batch_size
        collate = SelectiveLossCollator(pad_token_id(self.processing_class, model))
        out = []
        try:
            for i in range(0, len(self.forget_dataset), bs):
                rows = [self.forget_dataset[j] for j in range(i, min(i + bs, len(self.forget_dataset)))]
                part = {k: v.to(self.args.device) for k, v in collate(rows).items()}
                with self.autocast_smart_context_manager():
                    out.append(sequence_nll(model, part).float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out).numpy()

    def forget_and_retain_losses(self, model, inputs) -> dict[str, torch.Tensor]:
        """The loss and its parts for one micro-batch."""
        a = self.args
        forget = inputs["forget"]
        parts: dict[str, torch.Tensor] = {}
        if a.method == "npo":
            nll = sequence_nll(model, forget)
            ref = self.ref_nll.to(nll.device)[inputs["forget_index"].to(nll.device)]
            parts["forget_loss"] = npo_loss(nll, ref, a.beta)
        else:
            parts["forget_loss"] = -mean_nll(model, forget)
        if not a.uses_retain:
            parts["loss"] = parts["forget_loss"]
            return parts
        retain = inputs["retain"]
        if a.retain_loss_type == "KL":
            parts["retain_loss"] = kl_to_reference(model, self.ref_model, retain)
        else:
            parts["retain_loss"] = mean_nll(model, retain)
        parts["loss"] = a.gamma * parts["forget_loss"] + a.alpha * parts["retain_loss"]
        return parts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parts = self.forget_and_retain_losses(model, inputs)
        loss = parts["loss"]
        if return_outputs:
            return loss, {k: v.detach() for k, v in parts.items()}
        return loss


def forget_probability(model, dataset, pad_id: int, batch_size: int = 32) -> np.ndarray:
    """``exp(-mean NLL)`` of the trained tokens of each row (a quick check of forgetting)."""
    collate = SelectiveLossCollator(pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(dataset), batch_size):
                rows = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
                part = {k: v.to(device) for k, v in collate(rows).items()}
                res = token_nll(model, part["input_ids"], part["labels"], attention_mask=part["attention_mask"])
                counts = res.count_per_row().clamp(min=1)
                out.append(torch.exp(-(res.sum_per_row() / counts)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


__all__ = [
    "UNLEARNING_METHODS",
    "ForgetRetainCollator",
    "ForgetRetainDataset",
    "UnlearningConfig",
    "UnlearningTrainer",
    "forget_probability",
    "kl_to_reference",
    "mean_nll",
    "npo_loss",
    "sequence_nll",
]
