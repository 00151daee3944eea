"""The REINFORCE loop behind :func:`~.reinforce.reinforce_model` and
:func:`~.reinforce.two_step_reinforce_model`: :class:`ForgetMaskTrainer`, with a Trainer-like surface
(``train(resume_from_checkpoint=...)``, ``evaluate()``, ``save_model()``; those two in :mod:`.trainer_io`).

Written on Accelerate's primitives rather than on ``transformers.Trainer``, which assumes one model,
one optimizer and one loss: here two modules have their own optimizers, phases freeze one or the other
(``freeze_lm``; ``freeze_policy``: the LM learns a frozen policy's greedy keep sets), K samples share
noise across processes, and the two backward passes run in a fixed order. Every global batch is
sharded over processes so 1 and N processes compute the same thing; all randomness is drawn from
``(seed, epoch, step)`` so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import ForgetfulError, check_probability
from ..models.loading import bf16_native
from ..nll import unwrap_model
from ..nll_backends import training_loss_backend
from ..tokens import pad_token_id
from ..training.interrupts import StopOnSignal, TrainingInterrupted
from . import compression as comp
from . import reinforce_core as core
from .examples import ForgetBatch, ForgetCollator
from .options import DEFAULT_KEEP_RATIO
from .policies import ForgetMask, LearnedForgetMask
from .reinforce_config import (
    SCHEDULERS,
    ForgetTrainingConfig,
    ForgetTrainingResult,
    Phase,
    check_dataset,
    check_exploration,
    row_lengths,
    trackers_of,
)
from .reinforce_config import phases as phases_of
from .trainer_io import TrainerIO, TrainerState
from .units import unit_gumbel_keep, whole_units_kept


class ForgetMaskTrainer(TrainerIO):
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
        keep_ratio: float = DEFAULT_KEEP_RATIO,
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
        check_probability("keep_ratio", keep_ratio, allow_one=True)
        check_exploration(method, exploration_epochs)
        if not isinstance(policy, ForgetMask):
            raise ForgetfulError(f"mask must be a forgetful ForgetMask policy, got {type(policy).__name__}")
        if train_dataset is None:
            raise ForgetfulError("train_dataset is required")
        check_dataset(train_dataset, "train_dataset", args.budget)
        check_dataset(eval_dataset, "eval_dataset", args.budget)
        if args.keep_best and eval_dataset is None:
            raise ForgetfulError("keep_best needs an eval_dataset to score the policy on")
        phases = phases_of(method, policy, list(exploration_epochs), args.freeze_lm, args.freeze_policy)
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)

        self.args = args
        self.keep_ratio = keep_ratio
        self.phases = phases
        self.tokenizer = tokenizer
        self.learned = isinstance(policy, LearnedForgetMask)
        if args.fp16:
            mp = "fp16"
        elif args.bf16 or (args.bf16 is None and not args.use_cpu and bf16_native()):
            mp = "bf16"
        else:
            mp = "no"
        trackers = trackers_of(args.report_to)
        project_dir = args.output_dir or "."
        # cpu=True on a machine without GPUs also makes a multi-process launch (torchrun) use gloo
        cpu = args.use_cpu or not torch.cuda.is_available()
        self.loss_backend = training_loss_backend(args)
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
        self.context_lengths = row_lengths(train_dataset, "context_ids")
        self.target_lengths = row_lengths(train_dataset, "target_ids")
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
        self.micro = args.per_device_train_batch_size * self.world  # rows per global micro-batch
        self.rows_per_step = self.micro * args.gradient_accumulation_steps
        if len(train_dataset) < self.rows_per_step:
            raise ForgetfulError(
                f"the training set has {len(train_dataset)} examples, fewer than one step "
                f"({args.per_device_train_batch_size} per device x {self.world} processes x "
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
            self.lm_opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
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
        self.state = TrainerState()
        acc.register_for_checkpointing(*(s for s in (self.lm_sched, self.policy_sched) if s is not None), self.state)
        if trackers:
            acc.init_trackers(args.run_name, config={**asdict(args), "keep_ratio": keep_ratio})

    # -- randomness: a pure function of (seed, epoch, step) ---------------------------------
    def _generator(self, *key: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(hash((self.args.seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.train_dataset), generator=self._generator(1, epoch))

    # -- one micro-batch ---------------------------------------------------------------------
    def _budget_kwargs(self) -> dict:
        return {"keep_ratio": self.keep_ratio if self.args.budget is None else None, "budget": self.args.budget}

    def _micro_loss(
        self,
        batch: ForgetBatch,
        phase: Phase,
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
        eligible, forced = comp.eligible_tokens(b.context_mask, args.keep_first, b.protect_mask)
        k = comp.budget_counts(
            b.context_mask, keep_first=args.keep_first, protect=b.protect_mask, **self._budget_kwargs()
        )
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
                random_keep = comp.gumbel_topk_keep(zeros, k, eligible, forced, K, noise=rand_noise).keep
            else:
                random_keep = unit_gumbel_keep(zeros, units, k, eligible, forced, K, noise=rand_noise).keep
            keep = random_keep if keep is None else torch.where(explore_rows.view(1, -1, 1), random_keep, keep)
            inputs = comp.compress_examples(
                b.context_ids,
                b.context_mask,
                keep,
                b.target_ids,
                b.target_mask,
                self.pad_token_id,
                self._kept_per_row(b, use_policy),
                forget_layer=self.inner_policy.forget_layer,
            )
            train_lm = phase.train_lm and self.trains_lm
            with torch.set_grad_enabled(train_lm):
                out = comp.compressed_nll(self.model, inputs, self.loss_backend)
        # per (sample, row) mean target NLL -> reward
        per_row = out.mean_per_row()
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
        kept = int(comp.kept_counts(torch.tensor([b.context_length]), **budget)[0])
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
        """Advantages ``[K, B]`` of this process's samples and the baseline each was compared with."""
        acc, args = self.accelerator, self.args
        reduce = (lambda t: acc.reduce(t, "sum")) if self.world > 1 else None
        adv, base, self.state.baseline = core.advantages(
            reward, own, args.baseline, self.state.baseline, args.baseline_momentum, args.normalize_advantages, reduce
        )
        return adv, base

    # -- the loop ----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> ForgetTrainingResult:
        """Run every epoch; returns ``(model, policy, history)``. ``resume_from_checkpoint``: ``True``
        takes the newest complete checkpoint in ``output_dir``, a path that checkpoint; ``None``
        follows ``args.resume_from_checkpoint``. Ctrl-C or SIGTERM stops after the current step, writes a
        checkpoint and raises :class:`TrainingInterrupted`."""
        from tqdm.auto import tqdm

        args, acc = self.args, self.accelerator
        self._started = time.perf_counter()
        if resume_from_checkpoint is None:
            resume_from_checkpoint = args.resume_from_checkpoint
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
        with StopOnSignal(checkpoint=bool(args.output_dir)) as signals:
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

    def _step(self, phase: Phase, order: torch.Tensor) -> dict[str, float]:
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
        lo, hi = self.rank * args.per_device_train_batch_size, (self.rank + 1) * args.per_device_train_batch_size
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
