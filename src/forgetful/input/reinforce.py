"""Train forget masks with REINFORCE while the LM learns to read compressed context.

* :func:`reinforce_model` (joint): every step samples ``K`` keep sets per context from the policy
  (an example uses random keep sets of the same budget instead with probability
  ``exploration_epochs[epoch]``); the LM is trained on the compressed inputs (NLL of the targets);
  the reward ``r = -NLL(y)`` per sample (detached) trains the policy with
  ``-(r - baseline) * log pi(K)``: leave-one-out baseline over the K samples (RLOO) or a moving
  average, normalised advantages, an entropy bonus.
* :func:`two_step_reinforce_model` (alternating): ``exploration_epochs[e]`` is a bool; ``True``
  trains the LM on random masks with the policy frozen, ``False`` trains the policy with the LM
  frozen.

Both are thin wrappers over :class:`ForgetMaskTrainer`, which has a Trainer-like surface
(``train(resume_from_checkpoint=...)``, ``evaluate()``, ``save_model()``). The loop is written on
Accelerate's primitives rather than on ``transformers.Trainer``, which assumes one model, one
optimizer and one loss: here two modules have their own optimizers, phases freeze one or the other,
K samples share noise across processes, and the two backward passes run in a fixed order. The
REINFORCE arithmetic (baselines, advantages, losses) is :mod:`.reinforce_core`'s.

Phases can also train the LM alone on a frozen policy's own greedy keep sets (``freeze_policy``:
the fair protocol's finetuning of an LM to read a learned policy's compressions), or the policy
alone (``freeze_lm``), keeping the policy that scores best on ``eval_dataset`` (``keep_best``).

Both run on Accelerate (``accelerate launch`` / ``torchrun`` give DDP unchanged; bf16 on GPU),
shard every global batch over processes so 1 and N processes compute the same thing, draw all
randomness from ``(seed, epoch, step)`` so a resumed run repeats an uninterrupted one exactly,
and checkpoint atomically: ``Accelerator.save_state`` (trained modules, optimizers, every
process's RNG) plus the schedulers and the loop's state registered with it, written under a
temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from ..errors import ForgetfulError, check_choices, check_probability
from ..loss_kernels import LossBackend, check_loss_backend, loss_backend_field
from ..models.loading import bf16_native
from ..nll import unwrap_model
from ..tokens import pad_token_id
from ..training.checkpoints import latest_checkpoint, mark_complete, rotate
from ..training.interrupts import StopOnSignal, TrainingInterrupted
from . import reinforce_core as core
from .compression import _eligible, budget_counts, compress_examples, compressed_nll, gumbel_topk_keep, kept_counts
from .evaluation import baseline_masks, batches_of, evaluate_strategy
from .examples import ForgetBatch, ForgetCollator
from .policies import ForgetMask, LearnedForgetMask
from .units import unit_gumbel_keep, whole_units_kept

logger = logging.getLogger(__name__)

STATE_NAME = "forget_trainer_state.json"
HISTORY_NAME = "history.json"
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
        default=None, metadata={"help": "Keep exactly this many context tokens (instead of forget_p)."}
    )
    per_device_batch_size: int = field(
        default=16, metadata={"help": "Rows per process per micro-batch.", "aliases": ["--batch_size", "--batch-size"]}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lm_learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate of the LM."})
    policy_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the policy."})
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
    mixed_precision: Literal["no", "bf16", "fp16"] | None = field(
        default=None, metadata={"help": "Default: bf16 on a GPU that has it, else no."}
    )
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
    resume: bool = field(default=False, metadata={"help": "Resume from the newest complete checkpoint in output_dir."})
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
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ForgetfulError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lm_learning_rate", "policy_learning_rate"):
            if getattr(self, name) <= 0:
                raise ForgetfulError(f"{name} must be positive, got {getattr(self, name)}")
        if self.budget is not None and self.budget < 1:
            raise ForgetfulError(f"budget must be at least 1 token, got {self.budget}")
        if self.freeze_lm and self.freeze_policy:
            raise ForgetfulError("freeze_lm and freeze_policy together train nothing")


class ForgetTrainingResult(NamedTuple):
    model: nn.Module
    policy: ForgetMask
    history: list[dict]


@dataclass
class _Phase:
    """What one epoch trains: the LM, the policy, the share of random (exploration) samples, and
    whether the LM reads the policy's greedy keep sets (a frozen learned policy)."""

    train_lm: bool
    train_policy: bool
    explore: float
    greedy: bool = False


@dataclass
class _State:
    """The loop's position and what it has seen; checkpointed through Accelerate."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    baseline: float | None = None  # moving-average baseline
    history: list[dict] = field(default_factory=list)
    best_nll: float | None = None  # keep_best: the best held-out NLL so far, its step and weights
    best_step: int | None = None
    best_policy: dict | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, state.get(f.name, getattr(_State(), f.name)))


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


def _row_lengths(ds, column: str) -> torch.Tensor:
    """Tokens per row of a list column, computed by Arrow (no Python lists)."""
    import numpy as np
    import pyarrow.compute as pc

    lengths = pc.list_value_length(ds.with_format("arrow")[column])
    return torch.from_numpy(lengths.to_numpy(zero_copy_only=False).astype(np.int64))


def _check_dataset(ds, name: str, budget: int | None) -> None:
    if ds is None:
        return
    cols = getattr(ds, "column_names", None)
    if cols is None or "context_ids" not in cols or "target_ids" not in cols:
        raise ForgetfulError(
            f"{name} needs context_ids and target_ids columns (build it with forgetful.data.load_forget_examples)"
        )
    if len(ds) == 0:
        raise ForgetfulError(f"{name} is empty")
    shortest = int(_row_lengths(ds, "context_ids").min())
    if shortest == 0 or int(_row_lengths(ds, "target_ids").min()) == 0:
        raise ForgetfulError(f"{name} has an example with an empty context or target")
    if budget is not None and budget > shortest:
        raise ForgetfulError(f"budget {budget} is larger than the shortest context in {name} ({shortest} tokens)")


def _trackers(report_to: str) -> list[str]:
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    if "all" in names:
        names = ["wandb", "tensorboard"]
    for n in names:
        if n not in ("wandb", "tensorboard"):
            raise ForgetfulError(f"report_to takes none, wandb, tensorboard or all, got '{n}'")
    if "wandb" in names and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"  # log locally; `wandb sync` uploads later
    return names


class ForgetMaskTrainer:
    """Trains a forget-mask policy and the LM that reads its compressions, by REINFORCE.

    ``method="reinforce"``: one joint epoch per entry of ``exploration_epochs`` (the share of rows
    that use a random keep set of the same budget); ``"two_step"``: ``True`` epochs train the LM on
    random masks, ``False`` epochs the policy with the LM frozen. Everything is checked here, before
    any training starts.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: ForgetMask,
        args: ForgetTrainingConfig | None = None,
        *,
        forget_p: float = 0.1,
        exploration_epochs: Sequence = (0.75, 0.5, 0.25, 0),
        method: Literal["reinforce", "two_step"] = "reinforce",
        train_dataset=None,
        eval_dataset=None,
        tokenizer=None,
    ):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        args = args or ForgetTrainingConfig()
        if method not in ("reinforce", "two_step"):
            raise ForgetfulError(f"method must be reinforce or two_step, got '{method}'")
        check_probability("forget_p", forget_p)
        check_exploration(method, exploration_epochs)
        if not isinstance(policy, ForgetMask):
            raise ForgetfulError(f"mask must be a forgetful ForgetMask policy, got {type(policy).__name__}")
        if train_dataset is None:
            raise ForgetfulError("train_dataset is required")
        _check_dataset(train_dataset, "train_dataset", args.budget)
        _check_dataset(eval_dataset, "eval_dataset", args.budget)
        if args.keep_best and eval_dataset is None:
            raise ForgetfulError("keep_best needs an eval_dataset to score the policy on")
        phases = _phases(method, policy, list(exploration_epochs), args.freeze_lm, args.freeze_policy)
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)

        self.args = args
        self.forget_p = forget_p
        self.phases = phases
        self.tokenizer = tokenizer
        self.learned = isinstance(policy, LearnedForgetMask)
        mp = args.mixed_precision
        if mp is None:
            mp = "bf16" if not args.use_cpu and bf16_native() else "no"
        trackers = _trackers(args.report_to)
        project_dir = args.output_dir or "."
        # cpu=True on a machine without GPUs also makes a multi-process launch (torchrun) use gloo
        cpu = args.use_cpu or not torch.cuda.is_available()
        check_loss_backend(args.loss_backend, torch.device("cpu" if cpu else "cuda"))
        self.accelerator = Accelerator(mixed_precision=mp, log_with=trackers or None, project_dir=project_dir, cpu=cpu)
        set_seed(args.seed)
        acc = self.accelerator
        self.world = acc.num_processes
        self.rank = acc.process_index
        self.pad_token_id = pad_token_id(tokenizer, unwrap_model(model))
        self.collate = ForgetCollator(self.pad_token_id)
        self.train_dataset = train_dataset
        # Row lengths up front: each process then collates only its own rows, yet draws the same
        # noise and uses the same global token counts as a single process would.
        self.context_lengths = _row_lengths(train_dataset, "context_ids")
        self.target_lengths = _row_lengths(train_dataset, "target_ids")
        self.eval_dataset = eval_dataset

        self.trains_lm = any(p.train_lm for p in phases) and not args.freeze_lm
        self.trains_policy = self.learned and any(p.train_policy for p in phases)
        for p in model.parameters():
            p.requires_grad_(self.trains_lm)
        if self.learned:
            for p in policy.parameters():
                p.requires_grad_(self.trains_policy)
        self.model = model
        self.policy = policy
        self.micro = args.per_device_batch_size * self.world  # rows per global micro-batch
        self.rows_per_step = self.micro * args.gradient_accumulation_steps
        if len(train_dataset) < self.rows_per_step:
            raise ForgetfulError(
                f"the training set has {len(train_dataset)} examples, fewer than one step "
                f"({args.per_device_batch_size} per device x {self.world} processes x "
                f"{args.gradient_accumulation_steps} accumulation); lower the batch size"
            )
        self.steps_per_epoch = len(train_dataset) // self.rows_per_step
        if args.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, args.max_steps_per_epoch)
        self.total_steps = self.steps_per_epoch * len(phases)

        # Optimizers and schedules, one per trained module. Accelerate places and wraps the trained
        # modules (DDP under a launcher); frozen ones are only moved. The schedulers are registered
        # for checkpointing but not prepared: every process steps them once per optimizer step
        # (Accelerate's wrapper would step them once per process, assuming a split data loader).
        self.lm_opt = self.policy_opt = self.lm_sched = self.policy_sched = None
        schedule = SCHEDULERS[args.lr_scheduler_type]
        if self.trains_lm:
            lm_steps = self.steps_per_epoch * sum(p.train_lm for p in phases)
            self.lm_opt = torch.optim.AdamW(
                model.parameters(), lr=args.lm_learning_rate, weight_decay=args.weight_decay
            )
            self.lm_sched = get_scheduler(schedule, self.lm_opt, int(args.warmup_ratio * lm_steps), lm_steps)
            self.model, self.lm_opt = acc.prepare(self.model, self.lm_opt)
        else:
            self.model = self.model.to(acc.device)
        if self.trains_policy:
            pol_steps = self.steps_per_epoch * sum(p.train_policy for p in phases)
            self.policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.policy_learning_rate)
            self.policy_sched = get_scheduler(schedule, self.policy_opt, int(args.warmup_ratio * pol_steps), pol_steps)
            self.policy, self.policy_opt = acc.prepare(self.policy, self.policy_opt)
        else:
            self.policy = self.policy.to(acc.device)
        self.inner_policy = unwrap_model(self.policy)
        if self.learned and getattr(self.inner_policy, "_embeddings", None) is None:
            self.inner_policy.attach(self.model)  # a policy built without a model reads this one
        self.state = _State()
        acc.register_for_checkpointing(*(s for s in (self.lm_sched, self.policy_sched) if s is not None), self.state)
        if trackers:
            acc.init_trackers(args.run_name, config={**asdict(args), "forget_p": forget_p})

    # -- randomness: a pure function of (seed, epoch, step) ---------------------------------
    def _generator(self, *key: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(hash((self.args.seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.train_dataset), generator=self._generator(1, epoch))

    # -- one micro-batch ---------------------------------------------------------------------
    def _budget_kwargs(self) -> dict:
        return {"forget_p": self.forget_p if self.args.budget is None else None, "budget": self.args.budget}

    def _micro_loss(
        self,
        batch: ForgetBatch,
        phase: _Phase,
        explore_rows: torch.Tensor,
        noise: torch.Tensor,
        rand_noise: torch.Tensor,
        counts: dict,
    ) -> tuple[dict, dict]:
        """Losses of this process's rows; ``counts`` holds global normalisers for the step."""
        args, acc = self.args, self.accelerator
        K = noise.shape[0]
        b = batch.to(acc.device)
        noise, rand_noise, explore_rows = noise.to(acc.device), rand_noise.to(acc.device), explore_rows.to(acc.device)
        eligible, forced = _eligible(b.context_mask, args.keep_first, b.protect_mask)
        k = budget_counts(b.context_mask, keep_first=args.keep_first, protect=b.protect_mask, **self._budget_kwargs())
        units = b.units(self.inner_policy.unit)
        use_policy = phase.train_policy or not phase.explore >= 1.0
        sample = None
        with acc.autocast():
            keep = None
            if use_policy and phase.greedy:
                keep = self.inner_policy.greedy(
                    b.context_ids,
                    b.context_mask,
                    keep_first=args.keep_first,
                    protect=b.protect_mask,
                    units=units,
                    **self._budget_kwargs(),
                ).unsqueeze(0)
            elif use_policy:
                with torch.set_grad_enabled(phase.train_policy and self.trains_policy):
                    sample = self.policy_sample(b, noise, k, units)
                keep = sample.keep
            # exploration: a random keep set of the same budget, of the policy's units
            zeros = torch.zeros_like(b.context_ids, dtype=torch.float)
            if units is None:
                random_keep = gumbel_topk_keep(zeros, k, eligible, forced, K, noise=rand_noise).keep
            else:
                random_keep = unit_gumbel_keep(zeros, units, k, eligible, forced, K, noise=rand_noise).keep
            keep = random_keep if keep is None else torch.where(explore_rows.view(1, -1, 1), random_keep, keep)
            inputs = compress_examples(
                b.context_ids,
                b.context_mask,
                keep,
                b.target_ids,
                b.target_mask,
                self.pad_token_id,
                self._kept_per_row(b, use_policy),
            )
            train_lm = phase.train_lm and self.trains_lm
            with torch.set_grad_enabled(train_lm):
                out = compressed_nll(self.model, inputs, args.loss_backend)
        # per (sample, row) mean target NLL -> reward
        per_row = out.sum_per_row() / out.count_per_row().clamp(min=1)
        reward = -per_row.detach().view(K, -1)
        result = {
            "reward_sum": reward.sum().detach(),
            "keep_sum": (keep & b.context_mask).sum().detach(),
            "ctx_sum": b.context_mask.sum().detach() * K,
        }
        if b.fact_mask is not None:  # the answer asked about, kept whole
            kept = whole_units_kept(
                keep.reshape(-1, keep.shape[-1]), b.fact_mask.repeat(K, 1), b.context_mask.repeat(K, 1)
            )
            result["answer_kept_sum"] = kept.float().sum()
        losses = {}
        if train_lm:
            losses["lm"] = out.nll.sum() / counts["target_tokens"] * self.world
            result["lm_loss_sum"] = out.nll.sum().detach()
        if phase.train_policy and self.trains_policy and sample is not None:
            own = ~explore_rows  # the policy learns from its own samples only
            adv, base = self._advantages(reward, own)
            pol_loss = core.policy_gradient_loss(
                adv,
                sample.log_prob,
                sample.entropy,
                own,
                samples=counts["policy_samples"],
                rows=counts["policy_rows"],
                entropy_coef=args.entropy_coef,
                scale=self.world,
            )
            if args.mode == "bernoulli":
                target = k.float() / b.context_mask.sum(-1).clamp(min=1)
                share = sample.expected_keep / b.context_mask.sum(-1).clamp(min=1)
                penalty = ((share - target) ** 2 * own.float()).sum() / counts["policy_rows"] * self.world
                pol_loss = pol_loss + args.budget_penalty * penalty
            losses["policy"] = pol_loss
            w = own.float().view(1, -1)
            result["policy_loss_sum"] = (-(adv * sample.log_prob.detach() * w).sum()).detach()
            result["entropy_sum"] = (sample.entropy.detach() * own.float()).sum()
            result["baseline_sum"] = (base * w).sum().detach()
        return result, losses

    def _kept_per_row(self, b: ForgetBatch, use_policy: bool) -> int | None:
        """The context tokens every sampled row keeps, known on the host (exact budgets on contexts
        and targets of one length, policy and random samples alike); None when rows may differ."""
        if (
            self.args.mode != "exact"
            or b.context_length is None
            or b.target_length is None
            or b.protect_mask is not None
        ):
            return None
        budget = {**self._budget_kwargs(), "keep_first": self.args.keep_first}
        kept = int(kept_counts(torch.tensor([b.context_length]), **budget)[0])
        if use_policy and self.inner_policy.kept_per_row(b.context_length, **budget) != kept:
            return None  # a policy with its own budget rule (identity, no context)
        return kept

    def policy_sample(self, b: ForgetBatch, noise: torch.Tensor, k: torch.Tensor, units: torch.Tensor | None = None):
        """The policy's K samples for this batch (``k``: the tokens each row keeps in all). Under
        DDP the logits come through the wrapper, so gradients are synchronised."""
        budget = {} if self.args.mode == "bernoulli" else self._budget_kwargs()
        kw = dict(
            mode=self.args.mode,
            num_samples=noise.shape[0],
            keep_first=self.args.keep_first,
            noise=noise,
            protect=b.protect_mask,
            units=units,
            **budget,
        )
        if self.policy is self.inner_policy:
            return self.inner_policy.sample(b.context_ids, b.context_mask, **kw)
        attn = b.context_mask
        logits = self.policy(b.context_ids, attn, protect=b.protect_mask, units=units).float()
        return self.inner_policy.sample_from_logits(logits.masked_fill(~attn, float("-inf")), attn, **kw)

    def _advantages(self, reward: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages ``[K, B]`` of this process's samples (normalised over the global batch) and
        the baseline each was compared with."""
        args, acc = self.args, self.accelerator
        reduce = (lambda t: acc.reduce(t, "sum")) if self.world > 1 else (lambda t: t)
        if args.baseline == "rloo":
            base = core.rloo_baseline(reward)
        else:
            mean_r = float(core.weighted_mean(reward, own.view(1, -1), reduce))
            prev = self.state.baseline if self.state.baseline is not None else mean_r
            base = torch.full_like(reward, prev)
            m = args.baseline_momentum
            self.state.baseline = m * prev + (1 - m) * mean_r
        adv = reward - base
        if args.normalize_advantages:
            adv = core.normalise(adv, own.view(1, -1), reduce)
        return adv, base

    # -- the loop ----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> ForgetTrainingResult:
        """Run every epoch; returns ``(model, policy, history)``. ``resume_from_checkpoint``: ``True``
        takes the newest complete checkpoint in ``output_dir``, a path that checkpoint; ``None``
        follows ``args.resume``. Ctrl-C or SIGTERM stops after the current step, writes a
        checkpoint and raises :class:`TrainingInterrupted`."""
        from tqdm.auto import tqdm

        args, acc = self.args, self.accelerator
        self._started = time.perf_counter()
        if resume_from_checkpoint is None:
            resume_from_checkpoint = args.resume
        if resume_from_checkpoint:
            self._resume(None if resume_from_checkpoint is True else Path(resume_from_checkpoint))
        if args.keep_best and self.state.global_step == 0 and self.state.best_nll is None:
            self.evaluate()  # the policy as it starts is a candidate too
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.global_step,
            disable=args.disable_tqdm or not acc.is_main_process,
            desc="train-forget",
            dynamic_ncols=True,
        )
        running: dict[str, float] = {}
        stopped = False
        with StopOnSignal() as signals:
            while self.state.epoch < len(self.phases):
                phase = self.phases[self.state.epoch]
                order = self._epoch_order(self.state.epoch)
                while self.state.step_in_epoch < self.steps_per_epoch:
                    stats = self._step(phase, order)
                    for key, v in stats.items():
                        running[key] = running.get(key, 0.0) + v
                    running["n"] = running.get("n", 0) + 1
                    self.state.step_in_epoch += 1
                    self.state.global_step += 1
                    bar.update(1)
                    if self.state.global_step % args.logging_steps == 0:
                        self._log(running, phase, bar)
                        running = {}
                    if args.eval_steps and self.state.global_step % args.eval_steps == 0:
                        self.evaluate()
                    if args.output_dir and args.save_steps and self.state.global_step % args.save_steps == 0:
                        self.save_checkpoint()
                    if signals.should_stop(acc):  # Ctrl-C / SIGTERM: checkpoint this step, then stop
                        bar.close()
                        folder = self.save_checkpoint() if args.output_dir else None
                        raise TrainingInterrupted(self.state.global_step, str(folder) if folder else None)
                    if args.stop_after_steps and self.state.global_step >= args.stop_after_steps:
                        stopped = True
                        break
                if stopped:
                    break
                if running.get("n"):
                    self._log(running, phase, bar)
                    running = {}
                self.state.epoch += 1
                self.state.step_in_epoch = 0
                if not args.eval_steps:
                    self.evaluate()
                if args.output_dir:
                    self.save_checkpoint()
        bar.close()
        if args.keep_best and not stopped and self.state.best_policy is not None:
            self.inner_policy.load_state_dict(self.state.best_policy)
            self.state.history.append(
                {
                    "step": self.state.global_step,
                    "best_step": self.state.best_step,
                    "best_eval_nll": self.state.best_nll,
                }
            )
        # Drop the DDP wrappers at the same point on every process: left to the garbage collector,
        # their reducers can be torn down while a peer still talks to them, which hangs gloo. The
        # process group stays up (unlike ``end_training``) so the caller can evaluate next.
        acc.wait_for_everyone()
        self.model, self.policy = unwrap_model(self.model), self.inner_policy
        self.lm_opt = self.policy_opt = None
        acc.free_memory()
        for tracker in acc.trackers:
            tracker.finish()
        acc.wait_for_everyone()
        return ForgetTrainingResult(self.model, self.inner_policy, self.state.history)

    def _step(self, phase: _Phase, order: torch.Tensor) -> dict[str, float]:
        args, acc = self.args, self.accelerator
        step_rows = order[
            self.state.step_in_epoch * self.rows_per_step : (self.state.step_in_epoch + 1) * self.rows_per_step
        ]
        g = self._generator(2, self.state.epoch, self.state.step_in_epoch)
        # One keep set per row where nothing learns from comparing samples: LM-only phases, and a
        # policy that is not learned (its samples train the LM to read that strategy's compressions).
        lm_only = (
            phase.train_lm and not phase.train_policy and (phase.explore >= 1.0 or not self.learned or phase.greedy)
        )
        K = 1 if lm_only else args.num_samples
        explore_all = torch.rand(len(step_rows), generator=g) < phase.explore
        micro_batches = [step_rows[i : i + self.micro] for i in range(0, len(step_rows), self.micro)]
        # Global normalisers for the whole step (all processes, all micro-batches).
        counts = {
            "target_tokens": float(int(self.target_lengths[step_rows].sum()) * K),
            "policy_samples": float(max(1, int((~explore_all).sum()) * K)),
            "policy_rows": float(max(1, int((~explore_all).sum()))),
        }
        totals: dict[str, float] = {}
        models = [
            m
            for m, trained in (
                (self.model, self.trains_lm and phase.train_lm),
                (self.policy, self.trains_policy and phase.train_policy),
            )
            if trained
        ]
        lo, hi = self.rank * args.per_device_batch_size, (self.rank + 1) * args.per_device_batch_size
        for i, rows in enumerate(micro_batches):
            # noise for the whole global micro-batch (as one process draws it), then this process's
            # rows; padding is on the right, so a token's noise does not depend on the batch width
            n_ctx = int(self.context_lengths[rows].max())
            noise = torch.rand((K, len(rows), n_ctx), generator=g)
            rand_noise = torch.rand((K, len(rows), n_ctx), generator=g)
            explore = explore_all[i * self.micro : (i + 1) * self.micro]
            local = self.collate(self.train_dataset.select(rows[lo:hi].tolist()).to_list())
            width = local.context_ids.shape[1]
            noise, rand_noise = noise[:, lo:hi, :width], rand_noise[:, lo:hi, :width]
            sync = i == len(micro_batches) - 1
            with contextlib.ExitStack() as stack:
                if not sync:
                    for m in models:
                        stack.enter_context(acc.no_sync(m))
                res, losses = self._micro_loss(local, phase, explore[lo:hi], noise, rand_noise, counts)
                # The two graphs are disjoint (rewards and embeddings are detached). Separate backward
                # passes keep the gradient all-reduces of the LM and of the policy in one order on
                # every process; interleaved in one pass, gloo/NCCL can deadlock.
                for name in ("lm", "policy"):
                    if name in losses:
                        acc.backward(losses[name])
            for key, v in res.items():
                totals[key] = totals.get(key, 0.0) + float(v)
        for m, opt, sched, trained in (
            (self.model, self.lm_opt, self.lm_sched, self.trains_lm and phase.train_lm),
            (self.policy, self.policy_opt, self.policy_sched, self.trains_policy and phase.train_policy),
        ):
            if trained:
                if args.max_grad_norm:
                    acc.clip_grad_norm_(m.parameters(), args.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        if self.world > 1:
            keys = sorted(totals)
            vec = acc.reduce(torch.tensor([totals[k] for k in keys], device=acc.device, dtype=torch.float64), "sum")
            totals = dict(zip(keys, vec.tolist()))
        n_samples = len(step_rows) * K
        stats = {
            "reward": totals.get("reward_sum", 0.0) / max(n_samples, 1),
            "keep_ratio": totals.get("keep_sum", 0.0) / max(totals.get("ctx_sum", 1.0), 1.0),
        }
        if "answer_kept_sum" in totals:
            stats["answer_kept"] = totals["answer_kept_sum"] / max(n_samples, 1)
        if "lm_loss_sum" in totals:
            stats["lm_loss"] = totals["lm_loss_sum"] / counts["target_tokens"]
        if "policy_loss_sum" in totals:
            stats["policy_loss"] = totals["policy_loss_sum"] / counts["policy_samples"]
            stats["entropy"] = totals["entropy_sum"] / counts["policy_rows"]
            stats["baseline"] = totals["baseline_sum"] / counts["policy_samples"]
        return stats

    def _log(self, running: dict[str, float], phase: _Phase, bar) -> None:
        n = running.pop("n", 1)
        entry = {k: v / n for k, v in running.items()}
        entry.update(
            step=self.state.global_step,
            epoch=self.state.epoch,
            explore=phase.explore,
            train_lm=phase.train_lm,
            train_policy=phase.train_policy,
            time_s=time.perf_counter() - self._started,
        )  # wall clock since train() began
        if self.lm_sched is not None:
            entry["lm_lr"] = self.lm_sched.get_last_lr()[0]
        if self.policy_sched is not None:
            entry["policy_lr"] = self.policy_sched.get_last_lr()[0]
        self.state.history.append(entry)
        bar.set_postfix({k: f"{entry[k]:.3f}" for k in ("lm_loss", "reward", "keep_ratio") if k in entry})
        self.accelerator.log(
            {f"train/{k}": v for k, v in entry.items() if isinstance(v, int | float)}, step=self.state.global_step
        )

    def evaluate(self) -> dict[str, Any]:
        """Held-out target NLL of the policy (and, with ``eval_baselines``, of the identity, random
        and recency baselines) at the training budget, on ``eval_batches`` batches; appended to the
        history and returned. With ``keep_best``, a policy better than every earlier one is kept."""
        if self.eval_dataset is None:
            return {}
        acc = self.accelerator
        batches = batches_of(
            self.eval_dataset, self.args.per_device_batch_size, self.pad_token_id, self.args.eval_batches
        )
        keep = 1.0 - self.forget_p
        strategies = {"policy": self.inner_policy}
        if self.args.eval_baselines:
            strategies.update(baseline_masks(self.model, self.args.seed, ("identity", "random", "recency"), acc.device))
        entry: dict[str, Any] = {"step": self.state.global_step, "epoch": self.state.epoch, "eval": True}
        for name, mask in strategies.items():
            res = evaluate_strategy(
                unwrap_model(self.model),
                mask,
                batches,
                keep_ratio=keep,
                pad_token_id=self.pad_token_id,
                keep_first=self.args.keep_first,
                device=acc.device,
                autocast=acc.autocast,
            )
            entry[f"eval_{name}_nll"] = res["nll"]
            for key in ("fact_recall", "answer_kept"):
                if res.get(key) is not None:
                    entry[f"eval_{name}_{key}"] = res[key]
        if self.args.keep_best and (self.state.best_nll is None or entry["eval_policy_nll"] < self.state.best_nll):
            self.state.best_nll, self.state.best_step = entry["eval_policy_nll"], self.state.global_step
            self.state.best_policy = {k: v.detach().cpu().clone() for k, v in self.inner_policy.state_dict().items()}
            entry["best"] = True
        self.state.history.append(entry)
        acc.log(
            {k.replace("eval_", "eval/"): v for k, v in entry.items() if k.startswith("eval_")},
            step=self.state.global_step,
        )
        if acc.is_main_process and not self.args.disable_tqdm:
            acc.print(
                f"eval @ step {self.state.global_step}: "
                + ", ".join(f"{k[5:-4]} {v:.3f}" for k, v in entry.items() if k.endswith("_nll"))
            )
        return entry

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the LM (and tokenizer) to ``output_dir/lm`` and a learned policy to
        ``output_dir/policy`` (default: ``args.output_dir``); one process writes under a launcher."""
        out = Path(output_dir or self.args.output_dir or ".")
        if self.accelerator.is_main_process:
            unwrap_model(self.model).save_pretrained(out / "lm")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(out / "lm")
            if self.learned:
                self.inner_policy.save_pretrained(out / "policy")
        self.accelerator.wait_for_everyone()
        return out

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` atomically: ``Accelerator.save_state`` (trained modules,
        optimizers, RNG of every process, the registered schedulers and loop state) into a
        temporary folder, marked complete and renamed into place by the main process."""
        acc, args = self.accelerator, self.args
        root = Path(args.output_dir)
        final = root / f"checkpoint-{self.state.global_step}"
        tmp = root / f".tmp-checkpoint-{self.state.global_step}"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # tied weights (the LM head and the embeddings) are saved once; Accelerate says so each time
        quiet = logging.getLogger("accelerate.utils.other")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            acc.save_state(str(tmp))
        finally:
            quiet.setLevel(level)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_NAME).write_text(json.dumps({"global_step": self.state.global_step}) + "\n")
            mark_complete(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            rotate(root, args.save_total_limit)
            self._write_history()
        acc.wait_for_everyone()
        return final

    def _write_history(self) -> None:
        from ..reporting import write_json

        if self.args.output_dir and self.accelerator.is_main_process:
            write_json(self.state.history, Path(self.args.output_dir) / HISTORY_NAME)

    def _resume(self, ckpt: Path | None = None) -> None:
        if ckpt is None:
            root = Path(self.args.output_dir) if self.args.output_dir else None
            ckpt = latest_checkpoint(root) if root else None
            if ckpt is None:
                self.accelerator.print("resume: no complete checkpoint found, starting fresh")
                return
        try:
            self.accelerator.load_state(str(ckpt))
        except (OSError, RuntimeError, KeyError, ValueError, EOFError) as exc:
            raise ForgetfulError(
                f"cannot resume from {ckpt}: {str(exc).splitlines()[0]} (a corrupt checkpoint, or one of another run?)"
            ) from None
        self.accelerator.print(f"resumed from {ckpt} (step {self.state.global_step})")


def _phases(method: str, mask: ForgetMask, exploration_epochs: list, freeze_lm: bool, freeze_policy: bool = False):
    """What each epoch trains, from the method and ``exploration_epochs``."""
    learned = isinstance(mask, LearnedForgetMask)
    if method == "two_step" and not learned and not all(exploration_epochs):
        raise ForgetfulError("policy epochs (False) need a learned mask (MLP, CNN-MLP or RNN)")
    if method == "reinforce":
        phases = [_Phase(train_lm=True, train_policy=learned, explore=float(e)) for e in exploration_epochs]
    else:
        phases = [
            _Phase(train_lm=True, train_policy=False, explore=1.0)
            if e
            else _Phase(train_lm=False, train_policy=True, explore=0.0)
            for e in exploration_epochs
        ]
    if freeze_lm:
        if not learned:
            raise ForgetfulError("freeze_lm with a mask that is not learned trains nothing")
        phases = [_Phase(False, p.train_policy, p.explore) for p in phases]
    if freeze_policy:
        if not learned:
            raise ForgetfulError("freeze_policy is for a learned policy (a baseline is never trained)")
        phases = [_Phase(p.train_lm, False, p.explore, greedy=True) for p in phases if p.train_lm]
        if not phases:
            raise ForgetfulError("freeze_policy leaves no epoch that trains the LM")
    return phases


def _with_overrides(args: ForgetTrainingConfig | None, overrides: dict) -> ForgetTrainingConfig:
    args = args or ForgetTrainingConfig()
    known = {f.name for f in fields(ForgetTrainingConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ForgetfulError(f"unknown training option(s) {', '.join(unknown)}")
    return replace(args, **overrides) if overrides else args


def _train(method, model, mask, forget_p, exploration_epochs, args, overrides, data) -> ForgetTrainingResult:
    args = _with_overrides(args, overrides)
    trainer = ForgetMaskTrainer(
        model, mask, args, forget_p=forget_p, exploration_epochs=exploration_epochs, method=method, **data
    )
    return trainer.train()


def reinforce_model(
    base_llm_model: nn.Module,
    mask: ForgetMask,
    forget_p: float = 0.1,
    exploration_epochs: Sequence[float] = (0.75, 0.5, 0.25, 0),
    *,
    train_dataset=None,
    eval_dataset=None,
    tokenizer=None,
    args: ForgetTrainingConfig | None = None,
    **overrides,
) -> ForgetTrainingResult:
    """Train the LM and the forget policy jointly, one epoch per entry of ``exploration_epochs``
    (the share of examples that use a random keep set of the same budget instead of the
    policy's sample). Returns ``(model, policy, history)``."""
    data = dict(train_dataset=train_dataset, eval_dataset=eval_dataset, tokenizer=tokenizer)
    return _train("reinforce", base_llm_model, mask, forget_p, exploration_epochs, args, overrides, data)


def two_step_reinforce_model(
    base_llm_model: nn.Module,
    mask: ForgetMask,
    forget_p: float = 0.1,
    exploration_epochs: Sequence[bool] = (True, False, True, False),
    *,
    train_dataset=None,
    eval_dataset=None,
    tokenizer=None,
    args: ForgetTrainingConfig | None = None,
    **overrides,
) -> ForgetTrainingResult:
    """Alternate: ``True`` epochs train the LM on random masks (policy frozen), ``False`` epochs
    train the policy by REINFORCE (LM frozen). Returns ``(model, policy, history)``."""
    data = dict(train_dataset=train_dataset, eval_dataset=eval_dataset, tokenizer=tokenizer)
    return _train("two_step", base_llm_model, mask, forget_p, exploration_epochs, args, overrides, data)
