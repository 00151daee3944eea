"""The options of input-forgetting training (:class:`ForgetTrainingConfig`, the flags of
``train-forget`` and ``forget-experiment``), what each epoch trains (:func:`phases`), and the checks
made before any training starts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import nn

from ..errors import ForgetfulError, check_choices
from ..nll_backends import LossBackend, loss_backend_field
from .policies import ForgetMask, LearnedForgetMask

# what Accelerate's schedulers are called here (transformers.get_scheduler's names)
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class ForgetTrainingConfig:
    """Options of :class:`ForgetMaskTrainer` (and so of :func:`reinforce_model`,
    :func:`two_step_reinforce_model` and ``forgetful train-forget``, whose flags these are)."""

    output_dir: str | None = field(
        default=None,
        metadata={
            "aliases": ["--out"],
            "help": "Output folder: checkpoints (and, from the CLI, lm/, policy/, results.json).",
        },
    )
    mode: Literal["exact", "bernoulli"] = field(
        default="exact",
        metadata={
            "help": "exact: keep exactly the budget (Gumbel-top-k); bernoulli: keep each token on its own, budget by penalty."
        },
    )
    num_samples: int = field(default=4, metadata={"help": "Keep sets sampled per context (K); RLOO needs at least 2."})
    baseline: Literal["rloo", "moving_average"] = field(default="rloo", metadata={"help": "REINFORCE baseline."})
    baseline_momentum: float = field(
        default=0.9, metadata={"help": "moving_average baseline: weight of the old mean in each update."}
    )
    normalize_advantages: bool = field(
        default=True, metadata={"help": "Normalise the advantages over the global batch (mean 0, std 1)."}
    )
    entropy_coef: float = field(
        default=0.01, metadata={"help": "Weight of the entropy bonus in the policy loss (keeps sampling alive)."}
    )
    budget_penalty: float = field(
        default=10.0, metadata={"help": "Bernoulli mode: weight of (expected keep share - target)^2."}
    )
    budget: int | None = field(
        default=None, metadata={"help": "Keep exactly this many context tokens (instead of the keep ratio)."}
    )
    per_device_train_batch_size: int = field(
        default=16,
        metadata={"help": "Rows per process per micro-batch (>= 1).", "aliases": ["--batch_size", "--batch-size"]},
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate of the LM (> 0)."})
    policy_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the policy (> 0)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the LM."})
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Share of each schedule's steps spent warming the learning rate up."}
    )
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "Learning-rate schedule after the warm-up: cosine, linear or constant."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip each module's gradient norm to this (0: no clipping)."}
    )
    freeze_lm: bool = field(default=False, metadata={"help": "Train the policy only."})
    freeze_policy: bool = field(
        default=False,
        metadata={
            "help": "Train the LM only, on the (learned) policy's own greedy keep sets; the policy is not trained."
        },
    )
    keep_best: bool = field(
        default=False,
        metadata={
            "help": "Score the policy on eval_dataset before training and at every evaluation; end with the best one "
            "(lowest held-out target NLL)."
        },
    )
    eval_baselines: bool = field(
        default=True, metadata={"help": "Evaluations also score the identity, random and recency baselines."}
    )
    keep_first: bool = field(default=True, metadata={"help": "Always keep token 0 (the attention sink)."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision (default: on a GPU that has it; false: off)."}
    )
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision (not with bf16)."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is there."})
    loss_backend: LossBackend = loss_backend_field()
    max_steps_per_epoch: int | None = field(
        default=None,
        metadata={"help": "At most this many optimizer steps per epoch (default: the whole training set)."},
    )
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: at the end of every epoch)."})
    eval_batches: int = field(default=8, metadata={"help": "Batches of eval_dataset each evaluation scores."})
    logging_steps: int = field(default=10, metadata={"help": "Append the running means to the history every N steps."})
    save_steps: int = field(
        default=0,
        metadata={"help": "Checkpoint every N steps (0: at the end of every epoch only, when output_dir is set)."},
    )
    save_total_limit: int = field(default=2, metadata={"help": "Complete checkpoints kept (older ones are deleted)."})
    resume_from_checkpoint: bool = field(
        default=False, metadata={"help": "Resume from the newest complete checkpoint in output_dir."}
    )
    report_to: str = field(default="none", metadata={"help": "none, wandb, tensorboard or all (comma separated)."})
    run_name: str = field(default="forget-mask", metadata={"help": "Name of the run for wandb / tensorboard."})
    seed: int = field(
        default=0, metadata={"help": "Seed of every random choice (policy initialisation, sampling noise, data order)."}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})
    stop_after_steps: int | None = field(default=None, metadata={"help": "End the run early (tests of interruption)."})

    def __post_init__(self):
        check_choices(self)
        if self.num_samples < 1 or (self.baseline == "rloo" and self.num_samples < 2):
            raise ForgetfulError(f"the leave-one-out baseline needs num_samples >= 2, got {self.num_samples}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ForgetfulError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "policy_learning_rate"):
            if getattr(self, name) <= 0:
                raise ForgetfulError(f"{name} must be positive, got {getattr(self, name)}")
        if self.budget is not None and self.budget < 1:
            raise ForgetfulError(f"budget must be at least 1 token, got {self.budget}")
        if self.bf16 and self.fp16:
            raise ForgetfulError("bf16 and fp16 together: choose one mixed precision")
        if self.freeze_lm and self.freeze_policy:
            raise ForgetfulError("freeze_lm and freeze_policy together train nothing")


class ForgetTrainingResult(NamedTuple):
    model: nn.Module
    policy: ForgetMask
    history: list[dict]


@dataclass
class Phase:
    """What one epoch trains: the LM, the policy, the share of random (exploration) samples, and
    whether the LM reads the policy's greedy keep sets (a frozen learned policy)."""

    train_lm: bool
    train_policy: bool
    explore: float
    greedy: bool = False


def check_exploration(method: str, exploration_epochs: Sequence) -> None:
    """One entry per epoch: shares of random keep sets in [0, 1] for ``reinforce``, booleans (LM
    epoch or policy epoch) for ``two_step``."""
    if isinstance(exploration_epochs, str | bytes) or not isinstance(exploration_epochs, Sequence):
        raise ForgetfulError(f"exploration_epochs must be a list, got {exploration_epochs!r}")
    if len(exploration_epochs) == 0:
        raise ForgetfulError("exploration_epochs is empty: give one entry per epoch")
    if method == "reinforce":
        for e in exploration_epochs:
            if isinstance(e, bool) or not isinstance(e, int | float) or not 0.0 <= float(e) <= 1.0:
                raise ForgetfulError(
                    f"reinforce_model: exploration_epochs entries are shares of random masks in [0, 1], got {e!r}"
                )
    else:
        for e in exploration_epochs:
            if not isinstance(e, bool):
                raise ForgetfulError(
                    "two_step_reinforce_model: exploration_epochs entries are booleans "
                    f"(True = LM epoch on random masks, False = policy epoch), got {e!r}"
                )


def row_lengths(ds, column: str) -> torch.Tensor:
    """Tokens per row of a list column, computed by Arrow (no Python lists)."""
    import numpy as np
    import pyarrow.compute as pc

    lengths = pc.list_value_length(ds.with_format("arrow")[column])
    return torch.from_numpy(lengths.to_numpy(zero_copy_only=False).astype(np.int64))


def check_dataset(ds, name: str, budget: int | None) -> None:
    if ds is None:
        return
    cols = getattr(ds, "column_names", None)
    if cols is None or "context_ids" not in cols or "target_ids" not in cols:
        raise ForgetfulError(
            f"{name} needs context_ids and target_ids columns (build it with forgetful.data.load_forget_examples)"
        )
    if len(ds) == 0:
        raise ForgetfulError(f"{name} is empty")
    shortest = int(row_lengths(ds, "context_ids").min())
    if shortest == 0 or int(row_lengths(ds, "target_ids").min()) == 0:
        raise ForgetfulError(f"{name} has an example with an empty context or target")
    if budget is not None and budget > shortest:
        raise ForgetfulError(f"budget {budget} is larger than the shortest context in {name} ({shortest} tokens)")


def trackers_of(report_to: str) -> list[str]:
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    if "all" in names:
        names = ["wandb", "tensorboard"]
    for n in names:
        if n not in ("wandb", "tensorboard"):
            raise ForgetfulError(f"report_to takes none, wandb, tensorboard or all, got '{n}'")
    if "wandb" in names and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"  # log locally; `wandb sync` uploads later
    return names


def phases(method: str, mask: ForgetMask, exploration_epochs: list, freeze_lm: bool, freeze_policy: bool = False):
    """What each epoch trains, from the method and ``exploration_epochs``."""
    learned = isinstance(mask, LearnedForgetMask)
    if method == "two_step" and not learned and not all(exploration_epochs):
        raise ForgetfulError("policy epochs (False) need a learned mask (MLP, CNN-MLP or RNN)")
    if method == "reinforce":
        phases = [Phase(train_lm=True, train_policy=learned, explore=float(e)) for e in exploration_epochs]
    else:
        phases = [
            Phase(train_lm=True, train_policy=False, explore=1.0)
            if e
            else Phase(train_lm=False, train_policy=True, explore=0.0)
            for e in exploration_epochs
        ]
    if freeze_lm:
        if not learned:
            raise ForgetfulError("freeze_lm with a mask that is not learned trains nothing")
        phases = [Phase(False, p.train_policy, p.explore) for p in phases]
    if freeze_policy:
        if not learned:
            raise ForgetfulError("freeze_policy is for a learned policy (a baseline is never trained)")
        phases = [Phase(p.train_lm, False, p.explore, greedy=True) for p in phases if p.train_lm]
        if not phases:
            raise ForgetfulError("freeze_policy leaves no epoch that trains the LM")
    return phases
