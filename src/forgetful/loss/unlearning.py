"""Post-hoc unlearning on the selective-loss trainer stack: the trainer, its config and its data.
The methods (GradAscent, GradDiff, NPO, SimNPO, RMU) are a registry, one file per method
(:mod:`.unlearn`): the trainer looks ``args.method`` up and asks it for each micro-batch's loss.

Each step reads a micro-batch of forget rows and, for every method but ``grad_ascent``, as many
retain rows, each drawn uniformly at random when its forget row is read (open-unlearning's
``ForgetRetainDataset``, anchored on the forget set: an epoch is one pass over the forget rows).
Micro-batch losses are averaged over the gradient-accumulation steps, as the HF Trainer that
open-unlearning runs does. Defaults: open-unlearning's TOFU unlearning recipe (lr 1e-5, 10 epochs,
effective batch 32, weight decay 0.01, one warmup epoch) and each method's own loss options (NPO
beta 0.1; SimNPO beta 4.5, gamma 0.125, delta 0; RMU layer 7, steering coefficient 2, EMBED_DIFF
retain loss; alpha 1 and, where not said, gamma 1 and an NLL retain loss), except RMU's trainable
parameters, WMDP's choice rather than open-unlearning's every parameter (``rmu_params``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from ..errors import ForgetfulError
from ..nll import TokenNLL, token_nll
from ..tokens import pad_token_id
from .trainer import SelectiveLossCollator, SelectiveLossConfig, SelectiveLossTrainer, validate_loss_masks
from .unlearn import UNLEARNING_METHODS, unlearning_method
from .unlearn.base import RETAIN_LOSS_TYPES


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
    """The loss options of the unlearning methods, declared once for ``unlearn`` and
    ``tofu-experiment``. ``beta``, ``gamma`` and ``retain_loss_type`` left unset take the method's
    own default (open-unlearning's ``configs/trainer/<Method>.yaml``); a value given applies to every
    method that reads it."""

    beta: float | None = field(
        default=None, metadata={"help": "npo, simnpo: inverse temperature (default: npo 0.1, simnpo 4.5)."}
    )
    alpha: float = field(default=1.0, metadata={"help": "Every method with a retain set: weight of the retain loss."})
    gamma: float | None = field(
        default=None,
        metadata={"help": "Every method with a retain set: weight of the forget loss (default: simnpo 0.125, else 1)."},
    )
    retain_loss_type: str | None = field(
        default=None,
        metadata={
            "help": "NLL, KL (to the reference model) or, for rmu, EMBED_DIFF (its hidden states to the reference's); "
            "default: rmu EMBED_DIFF, else NLL."
        },
    )
    delta: str = field(
        default="0",
        metadata={
            "help": "simnpo: margin subtracted from the length-normalised NLL (open-unlearning: 0), a number or "
            "'fitted': the model's mean forget NLL per token before unlearning; anything else is refused."
        },
    )
    steering_coeff: float = field(
        default=2.0,
        metadata={
            "help": "rmu: norm of the random target of the forget tokens' hidden states (open-unlearning: 2); unused "
            "when steering_scale is set. Must be positive."
        },
    )
    steering_scale: float | None = field(
        default=None,
        metadata={
            "help": "rmu, adaptive: the target's norm is this factor times the mean norm of the steered layer's output "
            "over the forget answers, measured on the model before unlearning (e.g. 1: as long as an average "
            "forget activation); unset: steering_coeff. Must be positive."
        },
    )
    rmu_layer: int | None = field(
        default=None,
        metadata={
            "help": "rmu: the decoder layer (0-based) whose output is steered; default open-unlearning's 7, or the "
            "last layer of a model with fewer than 8; a layer the model lacks is refused."
        },
    )
    rmu_params: str = field(
        default="wmdp",
        metadata={
            "help": "rmu: the parameters that train, the rest frozen: wmdp (WMDP's choice: the MLP output projection, "
            "down_proj, of layers L-2..L) or a regular expression (full match) of parameter names, e.g. '.*' for "
            "every parameter (open-unlearning's TOFU config; with tied embeddings the LM head too). A pattern that "
            "is no regular expression, or matches nothing the loss reaches, is refused."
        },
    )

    def check_loss_options(self) -> None:
        if self.retain_loss_type is not None and self.retain_loss_type not in RETAIN_LOSS_TYPES:
            raise ForgetfulError(
                f"retain_loss_type must be one of {', '.join(RETAIN_LOSS_TYPES)}, got '{self.retain_loss_type}'"
            )
        if self.beta is not None and self.beta <= 0:
            raise ForgetfulError(f"beta must be positive, got {self.beta}")
        for name in ("alpha", "gamma"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ForgetfulError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.steering_coeff <= 0:
            raise ForgetfulError(
                f"steering_coeff must be positive, got {self.steering_coeff}: RMU's target is steering_coeff times a "
                "unit vector (open-unlearning: 2)"
            )
        if self.steering_scale is not None and self.steering_scale <= 0:
            raise ForgetfulError(
                f"steering_scale must be positive, got {self.steering_scale}: adaptive RMU's target is steering_scale "
                "times the layer's mean activation norm"
            )
        if self.rmu_layer is not None and self.rmu_layer < 0:
            raise ForgetfulError(f"rmu_layer must not be negative, got {self.rmu_layer}")
        parse_delta(self.delta)
        if self.rmu_params != "wmdp":
            try:
                re.compile(self.rmu_params)
            except re.error as e:
                raise ForgetfulError(f"rmu_params '{self.rmu_params}' is not a regular expression: {e}") from None


def parse_delta(delta) -> float | str:
    """SimNPO's margin option as the method reads it: a float, or ``"fitted"``."""
    if delta == "fitted":
        return delta
    try:
        return float(delta)
    except (TypeError, ValueError):
        raise ForgetfulError(
            f"delta must be a number or 'fitted' (the model's mean forget NLL per token before unlearning), got '{delta}'"
        ) from None


def _method_help() -> str:
    return "Unlearning method: " + "; ".join(f"{n} ({cls.paper})" for n, cls in UNLEARNING_METHODS.items()) + "."


def method_loss_options(options: UnlearningLossOptions, method: str) -> dict:
    """The loss options ``method`` trains with: ``options``' values, the method's own defaults where
    they are unset; checked (no model needed), so a command can refuse a bad combination before any
    training."""
    cls = unlearning_method(method)
    values = {f.name: getattr(options, f.name) for f in fields(UnlearningLossOptions)}
    values.update({k: v for k, v in cls.defaults.items() if values[k] is None})
    values["delta"] = parse_delta(values["delta"])
    checked = copy.copy(options)
    for key, value in values.items():
        setattr(checked, key, value)
    UnlearningLossOptions.check_loss_options(checked)
    if values["retain_loss_type"] not in cls.retain_loss_types:
        raise ForgetfulError(
            f"unlearning method '{method}' takes retain_loss_type {', '.join(cls.retain_loss_types)}, "
            f"got '{values['retain_loss_type']}'"
        )
    return values


@dataclass
class UnlearningConfig(OpenUnlearningRecipe, UnlearningLossOptions):
    """The unlearning method and its options on open-unlearning's TOFU unlearning recipe."""

    method: str = field(default="npo", metadata={"help": _method_help()})
    num_train_epochs: float = field(
        default=10.0, metadata={"help": "Epochs over the forget set (open-unlearning: 10).", "aliases": ["--epochs"]}
    )
    logging_steps: float = field(default=5, metadata={"help": "Log the losses every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the forget and retain rows travel in extra columns."}
    )

    #: the options that belong to the method, not to the optimiser or the schedule
    METHOD_OPTIONS = (
        "method",
        "beta",
        "alpha",
        "gamma",
        "retain_loss_type",
        "delta",
        "steering_coeff",
        "steering_scale",
        "rmu_layer",
        "rmu_params",
    )
    RECIPE = (*SelectiveLossConfig.RECIPE, *METHOD_OPTIONS)

    def __post_init__(self):
        for key, value in method_loss_options(self, self.method).items():
            setattr(self, key, value)
        if self.loss_average != "micro_batch":
            raise ForgetfulError(
                f"unlearning averages each micro-batch's loss (open-unlearning's), got loss_average "
                f"'{self.loss_average}': leave it at micro_batch"
            )
        if self.method == "rmu":
            # RMU's loss stops at one layer: the later layers and the head get no gradient
            self.ddp_find_unused_parameters = True
        super().__post_init__()

    @property
    def uses_retain(self) -> bool:
        return unlearning_method(self.method).uses_retain


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


class UnlearningTrainer(SelectiveLossTrainer):
    """Unlearn ``forget_dataset`` (rows of ``input_ids``, ``attention_mask``, ``loss_mask``) by
    ``args.method`` (looked up in the registry of :mod:`.unlearn`), keeping
    ``retain_dataset`` (every method but ``grad_ascent``). For ``npo`` the reference NLL of every
    forget row is computed by the model as it is now (before training), unless ``ref_nll`` gives
    it; a KL or EMBED_DIFF retain loss keeps a frozen copy of that model (``ref_model``). Every NLL
    goes through ``args.loss_backend`` (:meth:`batch_nll`)."""

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
        self.ref_nll = None
        self.method = unlearning_method(args.method)(self)
        if self.method.needs_reference_model():
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False).to(self.args.device)
        if self.method.needs_reference_nll:
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

    def batch_nll(self, model, part: dict, summed: bool = False) -> TokenNLL:
        """The per-token NLL of the trained tokens of one collated part (forget or retain rows),
        through the run's loss backend and sparse-logits option: what every method's NLL is made of.
        ``summed``: the method reduces it with one weight for every token (a mean), a speed hint
        (:func:`~forgetful.nll.token_nll`)."""
        return token_nll(
            model,
            part["input_ids"],
            part["labels"],
            attention_mask=part.get("attention_mask"),
            sparse_logits=self.args.sparse_logits,
            loss_backend=self.loss_backend,
            summed=summed,
        )

    @torch.no_grad()
    def reference_nll(self, batch_size: int | None = None, per_token: bool = False) -> np.ndarray:
        """Summed NLL of every forget row under the current model (the NPO reference), in the
        training precision; ``per_token``: each row's mean NLL per trained token instead."""
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
                    nll = self.batch_nll(model, part)
                    out.append((nll.mean_per_row() if per_token else nll.sum_per_row()).float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out).numpy()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parts = self.method.losses(model, inputs)
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
    "ForgetRetainCollator",
    "ForgetRetainDataset",
    "OpenUnlearningRecipe",
    "UnlearningConfig",
    "UnlearningLossOptions",
    "UnlearningTrainer",
    "forget_probability",
    "method_loss_options",
    "parse_delta",
]
