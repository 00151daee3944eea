"""Loss forgetting: train a causal LM on chosen tokens only.

Every example carries a ``loss_mask`` beside ``input_ids``; token ``t`` is trained (predicted from
``t - 1``) iff ``loss_mask[t] == 1``. :class:`SelectiveLossCollator` pads the batch and folds the
mask into ``labels`` (``-100`` where masked, on padding and at position 0), so the Trainer's own
token count (``num_items_in_batch``) is exact under gradient accumulation and on many GPUs.
:class:`SelectiveLossTrainer` sums the cross-entropy of trained tokens, divides by that global
count, and computes vocabulary logits only at trained positions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..errors import ForgetfulError
from ..models.loading import bf16_native
from ..nll import IGNORE_INDEX, token_nll
from ..nll_backends import LOSS_BACKENDS, LossBackend, loss_backend_field, training_loss_backend
from ..tokens import pad_sequences, pad_token_id
from ..training.checkpoints import latest_trainer_checkpoint, mark_complete, rotate
from ..training.interrupts import StopOnSignal, TrainingInterrupted

REQUIRED_COLUMNS = ("input_ids", "loss_mask")
LOSS_AVERAGES = ("tokens", "micro_batch")


@dataclass
class SelectiveLossConfig(TrainingArguments):
    """``TrainingArguments`` plus the selective-loss options."""

    sparse_logits: bool = field(
        default=True, metadata={"help": "Compute vocabulary logits only at trained positions (same loss, less memory)."}
    )
    loss_backend: LossBackend = loss_backend_field()
    validate_loss_mask: bool = field(
        default=True, metadata={"help": "Check every loss_mask (0/1, same length as input_ids) before training."}
    )
    report_to: str | list[str] = field(default="none", metadata={"help": "none, wandb, tensorboard, all"})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision (default: on when the GPU supports it)."}
    )
    # Every weight of a causal LM gets a gradient from the LM loss, so DDP need not search the graph
    # for unused ones each step (Trainer's default for a PreTrainedModel); set True for models that
    # have parameters outside the loss.
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP: look for parameters without gradients every step."}
    )
    warmup_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Warm up for this many epochs: warmup_steps = int(epochs * rows) // effective batch, as "
            "open-unlearning computes it (overrides warmup_steps)."
        },
    )
    loss_average: str = field(
        default="tokens",
        metadata={
            "help": "tokens: sum of trained-token losses / the trained tokens of the whole optimizer step (exact "
            "under accumulation); micro_batch: the mean over each micro-batch, averaged over the accumulation "
            "steps (the HF model loss that open-unlearning trains with)."
        },
    )

    #: the options that define a training recipe, as results files record them
    RECIPE = (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "warmup_epochs",
        "weight_decay",
        "optim",
        "max_grad_norm",
        "loss_average",
        "seed",
        "bf16",
    )

    def recipe(self) -> dict:
        """The recipe options and their values (JSON-ready)."""
        values = self.to_dict()
        return {k: values[k] for k in self.RECIPE}

    def __post_init__(self):
        if self.loss_backend not in LOSS_BACKENDS:
            raise ForgetfulError(f"loss_backend must be one of {', '.join(LOSS_BACKENDS)}, got {self.loss_backend!r}")
        if not self.sparse_logits and self.loss_backend not in ("auto", "dense"):
            raise ForgetfulError(
                f"sparse_logits=False computes full logits, which loss_backend='{self.loss_backend}' never does: "
                "use loss_backend dense (or auto), or sparse_logits=True"
            )
        # HfArgumentParser turns an absent --report_to into [None]; mean our default, "none".
        if self.report_to is None or (isinstance(self.report_to, list) and not [r for r in self.report_to if r]):
            self.report_to = "none"
        if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            self.use_cpu = True
        if self.bf16 is None:
            self.bf16 = not self.use_cpu and bf16_native()
        if self.use_cpu and self.ddp_backend is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.ddp_backend = "gloo"  # CPU processes under a launcher (NCCL needs GPUs)
        if self.loss_average not in LOSS_AVERAGES:
            raise ForgetfulError(f"loss_average must be one of {', '.join(LOSS_AVERAGES)}, got '{self.loss_average}'")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ForgetfulError(f"warmup_epochs must not be negative, got {self.warmup_epochs}")
        super().__post_init__()
        training_loss_backend(self)  # a GPU kernel asked for where it cannot run: one line, before any work

    def effective_batch_size(self) -> int:
        """Rows per optimizer step over every process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * max(self.world_size, 1)

    def apply_warmup_epochs(self, rows: int) -> None:
        """Set ``warmup_steps`` from ``warmup_epochs`` for a dataset of ``rows`` rows."""
        if self.warmup_epochs is not None:
            self.warmup_steps = int((self.warmup_epochs * rows) // self.effective_batch_size())


class _StopCallback(TrainerCallback):
    """After each optimizer step: on a stop request, save a checkpoint and end training."""

    def __init__(self, stop: StopOnSignal, trainer: Trainer):
        self.stop, self.trainer, self.stopped_at = stop, trainer, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.should_stop(self.trainer.accelerator):
            control.should_save = bool(args.output_dir)
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def labels_from_loss_mask(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``labels`` for a causal LM: the token where it is trained, ``-100`` where it is masked, on
    padding and at position 0 (nothing predicts the first token)."""
    keep = loss_mask != 0  # a new tensor: the caller's mask stays as it was
    if attention_mask is not None:
        keep &= attention_mask.bool()
    keep[:, 0] = False
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


class SelectiveLossCollator:
    """Pads ``input_ids``/``attention_mask``/``loss_mask`` (right side) and folds the loss mask
    into ``labels`` (``-100`` on padding and where the loss mask is 0)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ForgetfulError("SelectiveLossCollator needs a pad token id (set tokenizer.pad_token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        for key in REQUIRED_COLUMNS:
            if key not in rows[0]:
                raise ForgetfulError(
                    f"training rows need a '{key}' column; build them with prepare_dataset_for_training"
                )
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids, real = pad_sequences([r["input_ids"] for r in rows], self.pad_token_id, width)
        if "attention_mask" in rows[0]:
            attn, _ = pad_sequences([r["attention_mask"] for r in rows], 0, width)
        else:
            attn = real.long()
        mask, _ = pad_sequences([r["loss_mask"] for r in rows], 0, width)
        # Padding is never trained; a token inside the row is trained by its loss mask alone, even
        # where the attention mask hides it from later tokens (TOFU rows mask pad-id tokens, as
        # open-unlearning's collator does).
        return {"input_ids": ids, "attention_mask": attn, "labels": labels_from_loss_mask(ids, mask, real)}


def validate_loss_masks(dataset: Dataset, name: str = "train_dataset") -> None:
    """Every row needs ``input_ids`` and a 0/1 ``loss_mask`` of the same length."""
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ForgetfulError(
            f"{name} has no {', '.join(missing)} column (columns: {', '.join(dataset.column_names)}); "
            "every example needs input_ids and a per-token loss_mask"
        )
    for start in range(0, len(dataset), 4096):
        chunk = dataset[start : start + 4096]
        for i, (ids, mask) in enumerate(zip(chunk["input_ids"], chunk["loss_mask"])):
            if mask is None or len(mask) != len(ids):
                got = "None" if mask is None else len(mask)
                raise ForgetfulError(f"{name} row {start + i}: loss_mask has length {got} but input_ids has {len(ids)}")
            if len(ids) == 0:
                raise ForgetfulError(f"{name} row {start + i} is empty (zero tokens)")
        flat = np.concatenate([np.asarray(m, dtype=np.float64) for m in chunk["loss_mask"]])
        bad = (flat != 0) & (flat != 1)
        if bad.any():
            raise ForgetfulError(f"{name}: loss_mask must hold only 0 and 1, found {flat[bad][0]!r}")


class SelectiveLossTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is the cross-entropy of the tokens with
    ``loss_mask == 1``, normalised by the global number of such tokens.

    Use it like the Trainer, with a dataset of ``input_ids`` (+ ``attention_mask``) and
    ``loss_mask`` columns (:func:`forgetful.prepare_dataset_for_training` makes them). The
    collator defaults to :class:`SelectiveLossCollator`; ``loss_mask`` survives
    ``remove_unused_columns``.
    """

    # We normalise by num_items_in_batch ourselves, so the Trainer must not divide by the
    # accumulation steps again, and must count labels for any model.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model=None,
        args: SelectiveLossConfig | TrainingArguments | None = None,
        *,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs,
    ):
        if args is None:
            raise ForgetfulError("SelectiveLossTrainer needs args (a SelectiveLossConfig)")
        self.loss_backend = training_loss_backend(args)
        if data_collator is None:
            data_collator = SelectiveLossCollator(pad_token_id(processing_class, model))
        if getattr(args, "validate_loss_mask", True):
            self._validate_datasets(train_dataset, eval_dataset)
        if train_dataset is not None and getattr(args, "warmup_epochs", None) is not None:
            args.apply_warmup_epochs(len(train_dataset))
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = True
        if getattr(args, "loss_average", "tokens") == "micro_batch":
            self.loss_is_scaled_for_ga = False  # the Trainer divides each micro-batch mean by the steps

    def _validate_datasets(self, train_dataset, eval_dataset) -> None:
        if train_dataset is not None:
            validate_loss_masks(train_dataset, "train_dataset")
        evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval_dataset": eval_dataset}
        for key, ds in evals.items():
            if ds is not None:
                validate_loss_masks(ds, key)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for col in ("loss_mask", "attention_mask"):
            if col not in self._signature_columns:
                self._signature_columns.append(col)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """As ``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest *complete*
        checkpoint in ``output_dir`` (a half-written one is never chosen). Ctrl-C or SIGTERM stops
        after the current step, writes a checkpoint and raises :class:`TrainingInterrupted`."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_trainer_checkpoint(self.args.output_dir)
        with StopOnSignal() as stop:
            callback = _StopCallback(stop, self)
            self.add_callback(callback)
            try:
                result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            finally:
                self.remove_callback(callback)
        if callback.stopped_at is not None:
            folder = Path(self._get_output_dir(trial=None)) / f"checkpoint-{callback.stopped_at}"
            raise TrainingInterrupted(callback.stopped_at, str(folder) if self.args.output_dir else None)
        return result

    def _finalize_training(self, *args, **kwargs):
        # Trainer adds the loss of the steps since the last logging step from this process only, and
        # logs (log history, trackers) and returns that as train_loss. Make it the mean over processes
        # first, as Trainer's logging steps do: each process's loss is its share of the global token
        # sum times the number of processes, so the mean is the global figure.
        if self.accelerator.num_processes > 1:
            self._tr_loss = self.accelerator.reduce(self._tr_loss.detach().clone(), reduction="mean")
        return super()._finalize_training(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        # The Trainer writes checkpoint-N in place and rotates old ones before it returns; we
        # rotate only after N is marked complete, so a kill at any moment leaves a usable one.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            mark_complete(run_dir / f"checkpoint-{self.state.global_step}")
            if limit:
                rotate(run_dir, limit)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        out = token_nll(
            model,
            inputs["input_ids"],
            labels,
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            sparse_logits=getattr(self.args, "sparse_logits", True),
            loss_backend=self.loss_backend,
            summed=True,  # the loss below is the sum over a count: one weight for every token
        )
        total = out.nll.sum()
        if getattr(self.args, "loss_average", "tokens") == "micro_batch":
            loss = total / max(out.nll.numel(), 1)
        elif num_items_in_batch is None:
            loss = total / out.nll.numel() if out.nll.numel() else total
        else:
            count = (
                num_items_in_batch.clamp(min=1) if torch.is_tensor(num_items_in_batch) else max(num_items_in_batch, 1)
            )
            loss = total / count
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # DDP averages gradients over processes; the global count already divides the sum.
                loss = loss * self.accelerator.num_processes
        if return_outputs:
            return loss, {"loss": loss, "token_nll": out.nll.detach()}
        return loss
