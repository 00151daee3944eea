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

Both run on Accelerate (``accelerate launch`` / ``torchrun`` give DDP unchanged; bf16 on GPU),
shard every global batch over processes so 1 and N processes compute the same thing, draw all
randomness from ``(seed, epoch, step)`` so a resumed run repeats an uninterrupted one exactly,
and checkpoint atomically (LM and policy via ``save_pretrained``, optimizers, schedulers, RNG,
step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .checkpointing import latest_checkpoint, mark_complete, rotate
from .compression import _eligible, compress_examples, gumbel_topk_keep, kept_counts
from .data import ForgetBatch, ForgetCollator
from .errors import ForgetfulError, check_probability
from .interrupts import StopOnSignal, TrainingInterrupted
from .masks import ForgetMask, LearnedForgetMask
from .token_loss import token_nll, unwrap_model

logger = logging.getLogger(__name__)

STATE_NAME = "forget_trainer_state.json"


@dataclass
class ForgetTrainingConfig:
    """Options of :func:`reinforce_model` and :func:`two_step_reinforce_model`."""

    output_dir: str | None = None
    mode: str = "exact"  # exact budget (Gumbel-top-k) | bernoulli (budget by penalty)
    num_samples: int = 4  # keep sets per context (K); RLOO needs at least 2
    baseline: str = "rloo"  # rloo | moving_average
    baseline_momentum: float = 0.9
    normalize_advantages: bool = True
    entropy_coef: float = 0.01
    budget_penalty: float = 10.0  # Bernoulli mode: weight of (expected keep share - target)^2
    budget: int | None = None  # keep exactly this many context tokens instead of forget_p
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lm_learning_rate: float = 1e-4
    policy_learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0
    freeze_lm: bool = False
    keep_first: bool = True
    mixed_precision: str | None = None  # no | bf16 | fp16; default bf16 on a GPU that has it
    use_cpu: bool = False  # train on the CPU even when a GPU is there
    max_steps_per_epoch: int | None = None
    eval_steps: int = 0  # 0: evaluate at the end of every epoch
    eval_batches: int = 8
    logging_steps: int = 10
    save_steps: int = 0  # 0: checkpoint at the end of every epoch only (when output_dir is set)
    save_total_limit: int = 2
    resume: bool = False
    report_to: str = "none"  # none | wandb | tensorboard | all (comma separated)
    run_name: str = "forget-mask"
    seed: int = 0
    disable_tqdm: bool = False
    stop_after_steps: int | None = None  # end the run early (for tests of interruption)

    def validate(self) -> None:
        if self.mode not in ("exact", "bernoulli"):
            raise ForgetfulError(f"mode must be 'exact' or 'bernoulli', got '{self.mode}'")
        if self.baseline not in ("rloo", "moving_average"):
            raise ForgetfulError(f"baseline must be 'rloo' or 'moving_average', got '{self.baseline}'")
        if self.num_samples < 1 or (self.baseline == "rloo" and self.num_samples < 2):
            raise ForgetfulError(f"the leave-one-out baseline needs num_samples >= 2, got {self.num_samples}")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ForgetfulError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lm_learning_rate", "policy_learning_rate"):
            if getattr(self, name) <= 0:
                raise ForgetfulError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr_scheduler_type not in ("cosine", "linear", "constant"):
            raise ForgetfulError(f"lr_scheduler_type must be cosine, linear or constant, got '{self.lr_scheduler_type}'")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ForgetfulError(f"mixed_precision must be no, bf16 or fp16, got '{self.mixed_precision}'")
        if self.budget is not None and self.budget < 1:
            raise ForgetfulError(f"budget must be at least 1 token, got {self.budget}")


class ForgetTrainingResult(NamedTuple):
    model: nn.Module
    policy: ForgetMask
    history: list[dict]


@dataclass
class _Phase:
    """What one epoch trains: the LM, the policy, and the share of random (exploration) samples."""

    train_lm: bool
    train_policy: bool
    explore: float


@dataclass
class _State:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    baseline: float | None = None  # moving-average baseline
    history: list[dict] = field(default_factory=list)


def _check_exploration(method: str, exploration_epochs: Sequence) -> None:
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


def _scheduler(optimizer, kind: str, total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


class _ForgetTrainer:
    """The shared loop of both methods."""

    def __init__(self, model, policy, forget_p, phases: list[_Phase], train_dataset, eval_dataset, tokenizer,
                 args: ForgetTrainingConfig):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.args = args
        self.forget_p = forget_p
        self.phases = phases
        self.tokenizer = tokenizer
        self.learned = isinstance(policy, LearnedForgetMask)
        mp = args.mixed_precision
        if mp is None:
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        trackers = _trackers(args.report_to)
        project_dir = args.output_dir or "."
        # cpu=True on a machine without GPUs also makes a multi-process launch (torchrun) use gloo
        cpu = args.use_cpu or not torch.cuda.is_available()
        self.accelerator = Accelerator(mixed_precision=mp, log_with=trackers or None, project_dir=project_dir, cpu=cpu)
        set_seed(args.seed)
        acc = self.accelerator
        self.world = acc.num_processes
        self.rank = acc.process_index
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None:
            pad = getattr(unwrap_model(model).config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
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

        # Optimizers and schedules, one per trained module.
        self.lm_opt = self.policy_opt = self.lm_sched = self.policy_sched = None
        if self.trains_lm:
            lm_steps = self.steps_per_epoch * sum(p.train_lm for p in phases)
            self.lm_opt = torch.optim.AdamW(model.parameters(), lr=args.lm_learning_rate, weight_decay=args.weight_decay)
            self.lm_sched = _scheduler(self.lm_opt, args.lr_scheduler_type, lm_steps, int(args.warmup_ratio * lm_steps))
        if self.trains_policy:
            pol_steps = self.steps_per_epoch * sum(p.train_policy for p in phases)
            self.policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.policy_learning_rate)
            self.policy_sched = _scheduler(self.policy_opt, args.lr_scheduler_type, pol_steps,
                                           int(args.warmup_ratio * pol_steps))
        # Accelerate places and wraps (DDP under a launcher); frozen modules are only moved. The
        # schedulers stay ours: every process steps them once per optimizer step (Accelerate's
        # wrapper would step them once per process, assuming a split data loader).
        if self.trains_lm:
            self.model, self.lm_opt = acc.prepare(self.model, self.lm_opt)
        else:
            self.model = self.model.to(acc.device)
        if self.trains_policy:
            self.policy, self.policy_opt = acc.prepare(self.policy, self.policy_opt)
        else:
            self.policy = self.policy.to(acc.device)
        self.inner_policy = unwrap_model(self.policy)
        if self.learned:
            self.inner_policy.attach(self.model)
        self.state = _State()
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
    def _micro_loss(self, batch: ForgetBatch, phase: _Phase, explore_rows: torch.Tensor, noise: torch.Tensor,
                    rand_noise: torch.Tensor, counts: dict) -> dict:
        """Losses of this process's rows; ``counts`` holds global normalisers for the step."""
        args, acc = self.args, self.accelerator
        K = noise.shape[0]
        b = batch.to(acc.device)
        noise, rand_noise, explore_rows = noise.to(acc.device), rand_noise.to(acc.device), explore_rows.to(acc.device)
        eligible, forced = _eligible(b.context_mask, args.keep_first)
        k = kept_counts(b.context_mask.sum(-1), forget_p=self.forget_p if args.budget is None else None,
                        budget=args.budget, keep_first=args.keep_first)
        use_policy = phase.train_policy or not phase.explore >= 1.0
        with acc.autocast():
            if use_policy:
                with torch.set_grad_enabled(phase.train_policy and self.trains_policy):
                    sample = self.policy_sample(b, noise, k)
                keep = sample.keep
            else:
                sample, keep = None, None
            random_keep = gumbel_topk_keep(torch.zeros_like(b.context_ids, dtype=torch.float), k, eligible, forced,
                                           K, noise=rand_noise).keep
            keep = random_keep if keep is None else torch.where(explore_rows.view(1, -1, 1), random_keep, keep)
            inputs = compress_examples(b.context_ids, b.context_mask, keep, b.target_ids, b.target_mask,
                                       self.pad_token_id)
            train_lm = phase.train_lm and self.trains_lm
            with torch.set_grad_enabled(train_lm):
                out = token_nll(self.model, inputs["input_ids"], inputs["labels"],
                                attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"],
                                target_length=inputs["target_length"])
        # per (sample, row) mean target NLL -> reward
        per_row = out.sum_per_row() / out.count_per_row().clamp(min=1)
        reward = -per_row.detach().view(K, -1)
        result = {"reward_sum": reward.sum().detach(), "keep_sum": (keep & b.context_mask).sum().detach(),
                  "ctx_sum": b.context_mask.sum().detach() * K}
        losses = {}
        if train_lm:
            lm_loss = out.nll.sum() / counts["target_tokens"] * self.world
            losses["lm"] = lm_loss
            result["lm_loss_sum"] = out.nll.sum().detach()
        if phase.train_policy and self.trains_policy and sample is not None:
            own = ~explore_rows  # the policy learns from its own samples only
            adv = self._advantages(reward, own)
            w = own.float().view(1, -1)
            pg = -(adv.detach() * sample.log_prob * w).sum() / counts["policy_samples"] * self.world
            ent = (sample.entropy * own.float()).sum() / counts["policy_rows"] * self.world
            pol_loss = pg - args.entropy_coef * ent
            if args.mode == "bernoulli":
                target = k.float() / b.context_mask.sum(-1).clamp(min=1)
                share = sample.expected_keep / b.context_mask.sum(-1).clamp(min=1)
                penalty = ((share - target) ** 2 * own.float()).sum() / counts["policy_rows"] * self.world
                pol_loss = pol_loss + args.budget_penalty * penalty
            losses["policy"] = pol_loss
            result["policy_loss_sum"] = (-(adv * sample.log_prob.detach() * w).sum()).detach()
            result["entropy_sum"] = (sample.entropy.detach() * own.float()).sum()
        return result, losses

    def policy_sample(self, b: ForgetBatch, noise: torch.Tensor, k: torch.Tensor):
        if self.args.mode == "bernoulli":
            return self.inner_policy.sample(b.context_ids, b.context_mask, mode="bernoulli",
                                            num_samples=noise.shape[0], keep_first=self.args.keep_first, noise=noise) \
                if self.policy is self.inner_policy else self._wrapped_sample(b, noise, "bernoulli", k)
        if self.policy is self.inner_policy:
            return self.inner_policy.sample(b.context_ids, b.context_mask, budget=k, num_samples=noise.shape[0],
                                            keep_first=self.args.keep_first, noise=noise)
        return self._wrapped_sample(b, noise, "exact", k)

    def _wrapped_sample(self, b, noise, mode, k):
        # Under DDP the forward must go through the wrapper so gradients are synchronised:
        # compute the logits with it, then sample exactly as the policy would.
        from .compression import bernoulli_keep

        attn = b.context_mask
        logits = self.policy(b.context_ids, attn).float().masked_fill(~attn, float("-inf"))
        eligible, forced = _eligible(attn, self.args.keep_first)
        if mode == "bernoulli":
            return bernoulli_keep(logits, eligible, forced, noise.shape[0], noise=noise)
        return gumbel_topk_keep(logits, k, eligible, forced, noise.shape[0], noise=noise)

    def _advantages(self, reward: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Advantages ``[K, B]`` of this process's samples, normalised over the global batch."""
        args, acc = self.args, self.accelerator
        K = reward.shape[0]
        if args.baseline == "rloo":
            adv = reward - (reward.sum(0, keepdim=True) - reward) / (K - 1)
        else:
            own_r = torch.stack([(reward * own.float()).sum(), own.float().sum() * K])
            if self.world > 1:
                own_r = acc.reduce(own_r, "sum")
            mean_r = float(own_r[0] / own_r[1].clamp(min=1))
            base = self.state.baseline if self.state.baseline is not None else mean_r
            adv = reward - base
            m = args.baseline_momentum
            self.state.baseline = m * base + (1 - m) * mean_r
        if args.normalize_advantages:
            w = own.float().expand_as(adv)
            stats = torch.stack([(adv * w).sum(), (adv * adv * w).sum(), w.sum()])
            if self.world > 1:
                stats = acc.reduce(stats, "sum")
            n = stats[2].clamp(min=1)
            mean = stats[0] / n
            var = (stats[1] / n - mean * mean).clamp(min=0)
            adv = (adv - mean) / (var.sqrt() + 1e-6)
        return adv

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> ForgetTrainingResult:
        from tqdm.auto import tqdm

        args, acc = self.args, self.accelerator
        self._started = time.perf_counter()
        if args.resume:
            self._resume()
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, disable=args.disable_tqdm or not acc.is_main_process,
                   desc="train-forget", dynamic_ncols=True)
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
                        self._evaluate()
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
                    self._evaluate()
                if args.output_dir:
                    self.save_checkpoint()
        bar.close()
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
        step_rows = order[self.state.step_in_epoch * self.rows_per_step:(self.state.step_in_epoch + 1) * self.rows_per_step]
        g = self._generator(2, self.state.epoch, self.state.step_in_epoch)
        K = 1 if (phase.train_lm and not phase.train_policy and phase.explore >= 1.0) else args.num_samples
        explore_all = torch.rand(len(step_rows), generator=g) < phase.explore
        micro_batches = [step_rows[i:i + self.micro] for i in range(0, len(step_rows), self.micro)]
        # Global normalisers for the whole step (all processes, all micro-batches).
        counts = {
            "target_tokens": float(int(self.target_lengths[step_rows].sum()) * K),
            "policy_samples": float(max(1, int((~explore_all).sum()) * K)),
            "policy_rows": float(max(1, int((~explore_all).sum()))),
        }
        totals: dict[str, float] = {}
        models = [m for m, trained in ((self.model, self.trains_lm and phase.train_lm),
                                       (self.policy, self.trains_policy and phase.train_policy)) if trained]
        lo, hi = self.rank * args.per_device_batch_size, (self.rank + 1) * args.per_device_batch_size
        for i, rows in enumerate(micro_batches):
            # noise for the whole global micro-batch (as one process draws it), then this process's
            # rows; padding is on the right, so a token's noise does not depend on the batch width
            n_ctx = int(self.context_lengths[rows].max())
            noise = torch.rand((K, len(rows), n_ctx), generator=g)
            rand_noise = torch.rand((K, len(rows), n_ctx), generator=g)
            explore = explore_all[i * self.micro:(i + 1) * self.micro]
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
        for m, opt, sched, trained in ((self.model, self.lm_opt, self.lm_sched, self.trains_lm and phase.train_lm),
                                       (self.policy, self.policy_opt, self.policy_sched,
                                        self.trains_policy and phase.train_policy)):
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
        if "lm_loss_sum" in totals:
            stats["lm_loss"] = totals["lm_loss_sum"] / counts["target_tokens"]
        if "policy_loss_sum" in totals:
            stats["policy_loss"] = totals["policy_loss_sum"] / counts["policy_samples"]
            stats["entropy"] = totals["entropy_sum"] / counts["policy_rows"]
        return stats

    def _log(self, running: dict[str, float], phase: _Phase, bar) -> None:
        n = running.pop("n", 1)
        entry = {k: v / n for k, v in running.items()}
        entry.update(step=self.state.global_step, epoch=self.state.epoch, explore=phase.explore,
                     train_lm=phase.train_lm, train_policy=phase.train_policy,
                     time_s=time.perf_counter() - self._started)  # wall clock since train() began
        if self.lm_sched is not None:
            entry["lm_lr"] = self.lm_sched.get_last_lr()[0]
        if self.policy_sched is not None:
            entry["policy_lr"] = self.policy_sched.get_last_lr()[0]
        self.state.history.append(entry)
        bar.set_postfix({k: f"{entry[k]:.3f}" for k in ("lm_loss", "reward", "keep_ratio") if k in entry})
        self.accelerator.log({f"train/{k}": v for k, v in entry.items() if isinstance(v, int | float)},
                             step=self.state.global_step)

    def _evaluate(self) -> None:
        if self.eval_dataset is None:
            return
        from .forget_eval import baseline_masks, batches_of, evaluate_strategy

        acc = self.accelerator
        batches = batches_of(self.eval_dataset, self.args.per_device_batch_size, self.pad_token_id, self.args.eval_batches)
        keep = 1.0 - self.forget_p
        strategies = {"policy": self.inner_policy,
                      **baseline_masks(self.model, self.args.seed, ("identity", "random", "recency"), "cpu")}
        entry: dict[str, Any] = {"step": self.state.global_step, "epoch": self.state.epoch, "eval": True}
        for name, mask in strategies.items():
            if name == "random":
                mask = mask.to(acc.device)
                mask.generator = torch.Generator(device=acc.device).manual_seed(self.args.seed)
            res = evaluate_strategy(unwrap_model(self.model), mask, batches, keep_ratio=keep,
                                    pad_token_id=self.pad_token_id, keep_first=self.args.keep_first,
                                    device=acc.device, autocast=acc.autocast)
            entry[f"eval_{name}_nll"] = res["nll"]
            if res.get("fact_recall") is not None:
                entry[f"eval_{name}_fact_recall"] = res["fact_recall"]
        self.state.history.append(entry)
        acc.log({k.replace("eval_", "eval/"): v for k, v in entry.items() if k.startswith("eval_")},
                step=self.state.global_step)
        if acc.is_main_process and not self.args.disable_tqdm:
            acc.print(f"eval @ step {self.state.global_step}: " + ", ".join(
                f"{k[5:-4]} {v:.3f}" for k, v in entry.items() if k.endswith("_nll")))

    # -- checkpoints ------------------------------------------------------------------------
    def _modules(self):
        """(name, module, optimizer, scheduler) of everything whose state a checkpoint holds."""
        out = []
        if self.trains_lm:
            out.append(("lm", self.model, self.lm_opt, self.lm_sched))
        if self.trains_policy:
            out.append(("policy", self.policy, self.policy_opt, self.policy_sched))
        return out

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` atomically (temporary folder, then rename)."""
        acc, args = self.accelerator, self.args
        root = Path(args.output_dir)
        final = root / f"checkpoint-{self.state.global_step}"
        tmp = root / f".tmp-checkpoint-{self.state.global_step}"
        acc.wait_for_everyone()
        if acc.is_main_process:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # Every process saves its own RNG state; the main process saves the rest.
        torch.save(
            {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            tmp / f"rng_state_{self.rank}.pt",
        )
        if acc.is_main_process:
            lm = unwrap_model(self.model)
            lm.save_pretrained(tmp / "lm")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / "lm")
            if self.learned:
                self.inner_policy.save_pretrained(tmp / "policy")
            for name, _, opt, sched in self._modules():
                torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / f"{name}_optim.pt")
            state = asdict(self.state)
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
            mark_complete(tmp)
            import shutil

            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            rotate(root, args.save_total_limit)
        acc.wait_for_everyone()
        return final

    def _resume(self) -> None:
        from safetensors.torch import load_file

        root = Path(self.args.output_dir) if self.args.output_dir else None
        ckpt = latest_checkpoint(root) if root else None
        if ckpt is None:
            self.accelerator.print("resume: no complete checkpoint found, starting fresh")
            return
        try:
            state = json.loads((ckpt / STATE_NAME).read_text())
            if self.trains_lm:
                lm_state = {}
                for f in sorted((ckpt / "lm").glob("*.safetensors")):
                    lm_state.update(load_file(str(f)))
                _, unexpected = unwrap_model(self.model).load_state_dict(lm_state, strict=False)
                if unexpected or not lm_state:
                    raise ForgetfulError(f"LM weights do not match the model ({len(lm_state)} tensors)")
            if self.learned and (ckpt / "policy").exists():
                pol = load_file(str(ckpt / "policy" / "model.safetensors"))
                self.inner_policy.load_state_dict(pol)
            for name, _, opt, sched in self._modules():
                blob = torch.load(ckpt / f"{name}_optim.pt", map_location="cpu", weights_only=False)
                opt.load_state_dict(blob["optimizer"])
                sched.load_state_dict(blob["scheduler"])
            rng_file = ckpt / f"rng_state_{self.rank}.pt"
            if rng_file.exists():
                rng = torch.load(rng_file, weights_only=False)
                torch.set_rng_state(rng["torch"])
                if rng["cuda"] is not None and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(rng["cuda"])
        except (OSError, StopIteration, json.JSONDecodeError, RuntimeError, KeyError) as exc:
            raise ForgetfulError(f"cannot resume from {ckpt}: {str(exc).splitlines()[0]} (a corrupt checkpoint?)") from None
        self.state = _State(**state)
        self.accelerator.print(f"resumed from {ckpt} (step {self.state.global_step})")


def _run(method: str, base_llm_model, mask, forget_p, exploration_epochs, train_dataset, eval_dataset, tokenizer,
         args: ForgetTrainingConfig | None, overrides: dict) -> ForgetTrainingResult:
    args = args or ForgetTrainingConfig()
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise ForgetfulError(f"unknown training option '{key}'")
        setattr(args, key, value)
    args.validate()
    check_probability("forget_p", forget_p)
    _check_exploration(method, exploration_epochs)
    exploration_epochs = list(exploration_epochs)
    if not isinstance(mask, ForgetMask):
        raise ForgetfulError(f"mask must be a forgetful ForgetMask policy, got {type(mask).__name__}")
    if train_dataset is None:
        raise ForgetfulError("train_dataset is required")
    _check_dataset(train_dataset, "train_dataset", args.budget)
    _check_dataset(eval_dataset, "eval_dataset", args.budget)
    if method == "two_step" and not isinstance(mask, LearnedForgetMask) and not all(exploration_epochs):
        raise ForgetfulError("policy epochs (False) need a learned mask (MLP, CNN-MLP or RNN)")
    if method == "reinforce":
        phases = [_Phase(train_lm=True, train_policy=isinstance(mask, LearnedForgetMask), explore=float(e))
                  for e in exploration_epochs]
    else:
        phases = [_Phase(train_lm=True, train_policy=False, explore=1.0) if e else
                  _Phase(train_lm=False, train_policy=True, explore=0.0) for e in exploration_epochs]
    if args.freeze_lm:
        if not isinstance(mask, LearnedForgetMask):
            raise ForgetfulError("freeze_lm with a mask that is not learned trains nothing")
        phases = [_Phase(False, p.train_policy, p.explore) for p in phases]
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trainer = _ForgetTrainer(base_llm_model, mask, forget_p, phases, train_dataset, eval_dataset, tokenizer, args)
    result = trainer.train()
    logger.info("trained in %.1fs", time.perf_counter() - start)
    return result


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
    return _run("reinforce", base_llm_model, mask, forget_p, exploration_epochs, train_dataset, eval_dataset,
                tokenizer, args, overrides)


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
    return _run("two_step", base_llm_model, mask, forget_p, exploration_epochs, train_dataset, eval_dataset,
                tokenizer, args, overrides)


# ------------------------------------------------------------------------------------------------
# forgetful train-forget
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainForgetArguments:
    model: str = field(metadata={"help": "The base LM: a folder (save_pretrained) or a Hub name."})
    out: str = field(metadata={"help": "Output folder: lm/, policy/, checkpoints, history.json, results.json."})
    mask: str = field(default="mlp", metadata={"help": "Policy: mlp, cnn_mlp, rnn or birnn."})
    method: str = field(default="reinforce", metadata={"help": "reinforce (joint) or two_step (alternating)."})
    forget_p: float = field(default=0.1, metadata={"help": "Share of the context to forget, in [0, 1)."})
    exploration: str = field(default="0.75,0.5,0.25,0", metadata={
        "help": "One entry per epoch. reinforce: share of random keep sets (0.75,0.5,0.25,0); "
                "two_step: true = LM epoch on random masks, false = policy epoch (true,false,true,false)."})
    train_file: str | None = field(default=None, metadata={"help": "Text or JSON (context/target) file; default: embedded biographies."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out data; default: embedded biographies (other seed)."})
    context_length: int = field(default=256, metadata={"help": "Text files: context tokens per window (n)."})
    target_length: int = field(default=32, metadata={"help": "Text files: target tokens per window (m)."})
    stride: int | None = field(default=None, metadata={"help": "Text files: window stride (default n + m)."})
    max_examples: int | None = field(default=None)
    embedded_examples: int = field(default=2000)
    eval_examples: int = field(default=256)
    hidden_size: int = field(default=128, metadata={"help": "Policy width."})
    kernel_size: int = field(default=5, metadata={"help": "cnn_mlp: convolution width."})
    cell: str = field(default="gru", metadata={"help": "rnn/birnn: gru or lstm."})
    batch_size: int = field(default=16)
    num_samples: int = field(default=4, metadata={"help": "Keep sets sampled per context (RLOO baseline)."})
    mode: str = field(default="exact", metadata={"help": "exact (Gumbel-top-k budget) or bernoulli."})
    baseline: str = field(default="rloo", metadata={"help": "rloo or moving_average."})
    entropy_coef: float = field(default=0.01)
    budget: int | None = field(default=None, metadata={"help": "Keep exactly this many context tokens (instead of forget_p)."})
    lm_learning_rate: float = field(default=1e-4)
    policy_learning_rate: float = field(default=1e-3)
    gradient_accumulation_steps: int = field(default=1)
    freeze_lm: bool = field(default=False)
    max_steps_per_epoch: int | None = field(default=None)
    eval_steps: int = field(default=0)
    save_steps: int = field(default=0)
    resume: bool = field(default=False)
    report_to: str = field(default="none")
    mixed_precision: str | None = field(default=None)
    seed: int = field(default=0)


def parse_exploration(text: str, method: str) -> list:
    parts = [p.strip().lower() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ForgetfulError("exploration is empty: give one entry per epoch, e.g. 0.75,0.5,0.25,0")
    if method == "two_step":
        table = {"true": True, "1": True, "lm": True, "false": False, "0": False, "policy": False}
        if any(p not in table for p in parts):
            raise ForgetfulError(f"two_step exploration entries are true (LM epoch) or false (policy epoch), got {text!r}")
        return [table[p] for p in parts]
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ForgetfulError(f"reinforce exploration entries are numbers in [0, 1], got {text!r}") from None


def run_train_forget(a: TrainForgetArguments) -> dict:
    from .data import load_forget_examples
    from .forget_eval import baseline_masks, batches_of, evaluate_strategy
    from .masks import build_policy
    from .modeling import load_model
    from .reporting import plot_lines, write_json

    if a.method not in ("reinforce", "two_step"):
        raise ForgetfulError(f"method must be reinforce or two_step, got '{a.method}'")
    check_probability("forget_p", a.forget_p)
    exploration = parse_exploration(a.exploration, a.method)
    _check_exploration(a.method, exploration)
    out = Path(a.out)
    (out / "results.json").unlink(missing_ok=True)
    model, tok = load_model(a.model)
    data_kw = dict(context_length=a.context_length, target_length=a.target_length, stride=a.stride, seed=a.seed)
    train = load_forget_examples(a.train_file, tok, max_examples=a.max_examples,
                                 embedded_examples=a.embedded_examples, **data_kw)
    if a.eval_file is not None:
        held = load_forget_examples(a.eval_file, tok, max_examples=a.eval_examples, **data_kw)
    elif a.train_file is None:
        held = load_forget_examples(None, tok, embedded_examples=a.eval_examples, **{**data_kw, "seed": a.seed + 1234})
    else:
        held = None
    extra = {"kernel_size": a.kernel_size} if a.mask == "cnn_mlp" else {"cell": a.cell} if "rnn" in a.mask else {}
    # The policy's initial weights are a function of --seed alone: the global generator's state here
    # depends on what loading did before (which varies with Python's string-hash seed).
    torch.manual_seed(a.seed)
    policy = build_policy(a.mask, model, hidden_size=a.hidden_size, **extra)
    cfg = ForgetTrainingConfig(
        output_dir=str(out), mode=a.mode, num_samples=a.num_samples, baseline=a.baseline, entropy_coef=a.entropy_coef,
        budget=a.budget, per_device_batch_size=a.batch_size, gradient_accumulation_steps=a.gradient_accumulation_steps,
        lm_learning_rate=a.lm_learning_rate, policy_learning_rate=a.policy_learning_rate, freeze_lm=a.freeze_lm,
        max_steps_per_epoch=a.max_steps_per_epoch, eval_steps=a.eval_steps, save_steps=a.save_steps, resume=a.resume,
        report_to=a.report_to, mixed_precision=a.mixed_precision, seed=a.seed, run_name=f"forget-{a.mask}",
    )
    train_fn = reinforce_model if a.method == "reinforce" else two_step_reinforce_model
    result = train_fn(model, policy, forget_p=a.forget_p, exploration_epochs=exploration, train_dataset=train,
                      eval_dataset=held, tokenizer=tok, args=cfg)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under a launcher, one process evaluates and writes the outputs
        return {}
    result.model.save_pretrained(out / "lm")
    tok.save_pretrained(out / "lm")
    result.policy.save_pretrained(out / "policy")
    write_json(result.history, out / "history.json")
    steps = [h for h in result.history if "reward" in h]
    if steps:
        plot_lines({"reward": ([h["step"] for h in steps], [h["reward"] for h in steps])}, out / "reward.png",
                   xlabel="step", ylabel="reward (-target NLL)", title=f"REINFORCE: {a.mask} policy")
    final: dict = {"mask": a.mask, "method": a.method, "forget_p": a.forget_p, "exploration": exploration,
                   "train_examples": len(train)}
    if held is not None:
        device = next(result.model.parameters()).device
        batches = batches_of(held, a.batch_size, tok.pad_token_id)
        strategies = {a.mask: result.policy, **baseline_masks(result.model, a.seed, ("identity", "random", "recency"),
                                                              device)}
        for name, mask in strategies.items():
            res = evaluate_strategy(result.model, mask, batches, keep_ratio=1 - a.forget_p,
                                    pad_token_id=tok.pad_token_id, device=device)
            final[f"{name}_nll"] = res["nll"]
        print(f"held-out target NLL at keep {1 - a.forget_p:.2f}: "
              + ", ".join(f"{k[:-4]} {v:.3f}" for k, v in final.items() if k.endswith("_nll")))
    write_json(final, out / "results.json")
    return final
