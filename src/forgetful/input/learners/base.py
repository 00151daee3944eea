"""What every learner shares: the run it is given (:class:`LearnerRun`: policy, frozen LM, rows,
budget), what it returns (:class:`LearnerResult`), validation with the best policy kept
(:class:`BestOnValidation`), and a seeded order of training batches.

A learner fits a policy's keep-logits so that the LM's target NLL of the kept tokens is low; each
counts the tokens it made the LM read (``lm_tokens_forward`` / ``lm_tokens_backward``), so learners
are compared at equal LM passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import ForgetfulError
from ..evaluation import batches_of, evaluate_strategy
from ..examples import ForgetBatch, ForgetCollator
from ..policies import LearnedForgetMask


@dataclass
class LearnerRun:
    """One policy to fit at one budget. ``train`` and ``val`` are datasets of forgetting examples;
    ``val`` rows (held out of training) choose the best version; ``steps`` optimizer steps of
    ``batch_size`` rows; ``lm`` is read frozen unless a learner trains it."""

    policy: LearnedForgetMask
    lm: nn.Module
    train: object
    val: object
    keep_ratio: float
    pad_token_id: int
    steps: int
    batch_size: int
    learning_rate: float
    eval_steps: int
    seed: int = 0
    keep_first: bool = True
    device: torch.device | str = "cpu"
    autocast: object = None
    progress: bool = True
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.eval_steps < 1:
            raise ForgetfulError(
                f"steps, batch_size and eval_steps must be at least 1, got {self.steps}, {self.batch_size}, "
                f"{self.eval_steps}"
            )
        if not 0 < self.keep_ratio < 1:
            raise ForgetfulError(f"a learner fits a policy at a keep ratio in (0, 1), got {self.keep_ratio}")
        if len(self.train) < self.batch_size:
            raise ForgetfulError(f"{len(self.train)} training rows are fewer than one batch of {self.batch_size}")
        self.autocast = self.autocast or contextlib.nullcontext


@dataclass
class LearnerResult:
    """The history (one dict per logged step / evaluation), the best validation NLL and where it
    was reached (0: the policy as it started), and the LM tokens the learner read."""

    history: list[dict] = field(default_factory=list)
    best_nll: float | None = None
    best_step: int = 0
    lm_tokens_forward: int = 0
    lm_tokens_backward: int = 0
    extra: dict = field(default_factory=dict)


class BestOnValidation:
    """Scores the policy's greedy keep sets on the validation rows (target NLL of the frozen LM)
    and keeps a copy of the best weights; the policy as it starts is the first candidate."""

    def __init__(self, run: LearnerRun):
        self.run = run
        self.batches = batches_of(run.val, run.batch_size, run.pad_token_id)
        self.best_nll: float | None = None
        self.best_step = 0
        self.best_state: dict | None = None

    def score(self) -> float:
        r = self.run
        was = r.policy.training
        r.policy.eval()
        nll = evaluate_strategy(
            r.lm,
            r.policy,
            self.batches,
            keep_ratio=r.keep_ratio,
            pad_token_id=r.pad_token_id,
            keep_first=r.keep_first,
            device=r.device,
            autocast=r.autocast,
        )["nll"]
        r.policy.train(was)
        return nll

    def offer(self, step: int) -> dict:
        nll = self.score()
        entry = {"step": step, "eval": True, "eval_policy_nll": nll}
        if self.best_nll is None or nll < self.best_nll:
            self.best_nll, self.best_step = nll, step
            self.best_state = {k: v.detach().clone() for k, v in self.run.policy.state_dict().items()}
            entry["best"] = True
        return entry

    def restore(self) -> None:
        if self.best_state is not None:
            self.run.policy.load_state_dict(self.best_state)


def training_batches(run: LearnerRun, rows=None) -> Iterator[ForgetBatch]:
    """``run.steps`` batches of ``run.train`` (or ``rows``) in an order that is a function of
    ``run.seed``: epochs of seeded permutations, the last partial batch of an epoch dropped."""
    data = run.train if rows is None else rows
    collate = ForgetCollator(run.pad_token_id)
    g = torch.Generator().manual_seed(run.seed)
    per_epoch = len(data) // run.batch_size
    order: list[int] = []
    for step in range(run.steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(data), generator=g).tolist()
        at = (step % per_epoch) * run.batch_size
        yield collate(data.select(order[at : at + run.batch_size]).to_list()).to(run.device)
