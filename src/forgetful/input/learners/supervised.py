"""A supervised learner, LLMLingua-2's recipe: label training rows with the oracle's keep sets,
then fit the policy to them as a classifier of units.

The labels come from :class:`~forgetful.input.policies.oracle.OracleMask` on the frozen LM (a
search that reads the target: ``label_rounds`` rounds from the policy's prior), one per training
row of ``label_rows``; a unit's label is the share of its tokens the oracle kept. The policy's unit
scores are fitted listwise (ListNet, :func:`~forgetful.input.reinforce_core.listwise_loss`: the
softmax over its unit scores towards the softmax of the labels at ``label_temperature``, which
spreads the mass evenly over the kept units), for the run's steps, cycling over the labelled rows;
the version best on the validation rows is kept. The LM cost is the labelling (about one forward
of a compressed row per unit and search round).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ...errors import ForgetfulError
from ..compression import eligible_tokens
from ..evaluation import batches_of
from ..policies import OracleMask
from ..reinforce_core import listwise_loss
from ..units import unit_scores, unit_sizes
from .base import BestOnValidation, LearnerResult, LearnerRun


@dataclass
class SupervisedConfig:
    """Options of the supervised learner (``forget-experiment --learners supervised``)."""

    label_rows: int = field(default=64, metadata={"help": "Supervised learner: training rows the oracle labels."})
    label_rounds: int = field(default=2, metadata={"help": "Supervised learner: oracle search rounds per row."})
    label_temperature: float = field(
        default=0.1, metadata={"help": "Supervised learner: temperature of the labels' softmax (> 0)."}
    )

    def __post_init__(self):
        if self.label_rows < 1 or self.label_rounds < 0 or self.label_temperature <= 0:
            raise ForgetfulError(
                f"label_rows >= 1, label_rounds >= 0 and label_temperature > 0 are needed, got {self.label_rows}, "
                f"{self.label_rounds}, {self.label_temperature}"
            )


class SupervisedTrainer:
    """Fits ``run.policy`` to the oracle's keep sets of training rows (see the module docstring)."""

    def __init__(self, run: LearnerRun, config: SupervisedConfig | None = None):
        self.run, self.config = run, config or SupervisedConfig()
        if run.policy.unit == "token":
            raise ForgetfulError("the supervised learner labels units with the oracle: give the policy a unit")

    def label(self, result: LearnerResult) -> list[tuple]:
        """``(batch, units, label share [B, n], present [B, n])`` for each labelled batch."""
        from tqdm.auto import tqdm

        r, c = self.run, self.config
        start = getattr(r.policy, "prior", None) or "recency"
        oracle = OracleMask(r.lm, start=start, rounds=c.label_rounds).with_unit(r.policy.unit)
        oracle.forget_layer = r.policy.forget_layer
        rows = r.train.shuffle(seed=r.seed).select(range(min(c.label_rows, len(r.train))))
        labelled = []
        for b in tqdm(batches_of(rows, r.batch_size, r.pad_token_id), desc="oracle labels", disable=not r.progress):
            b = b.to(r.device)
            keep = oracle.choose(
                b, keep_ratio=r.keep_ratio, keep_first=r.keep_first, pad_token_id=r.pad_token_id, autocast=r.autocast
            )
            eligible, _ = eligible_tokens(b.context_mask, r.keep_first, b.protect_mask)
            units = r.policy.resolve_units(b.units(r.policy.unit), b.context_mask)
            sizes = unit_sizes(units, eligible)
            share = unit_sizes(units, eligible & keep).float() / sizes.clamp(min=1)
            labelled.append((b, units, share, sizes > 0))
        result.lm_tokens_forward += oracle.lm_tokens
        result.extra["label_rows"] = len(rows)
        return labelled

    def train(self) -> LearnerResult:
        from tqdm.auto import tqdm

        r, c = self.run, self.config
        result = LearnerResult()
        t0 = time.perf_counter()
        labelled = self.label(result)
        result.extra["seconds_labels"] = round(time.perf_counter() - t0, 1)
        tracker = BestOnValidation(r)
        result.history.append(tracker.offer(0))
        params = [p for p in r.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=r.learning_rate)
        r.policy.train()
        for step in tqdm(range(1, r.steps + 1), desc="supervised", disable=not r.progress, dynamic_ncols=True):
            b, units, share, present = labelled[(step - 1) % len(labelled)]
            eligible, _ = eligible_tokens(b.context_mask, r.keep_first, b.protect_mask)
            with r.autocast():
                logits = r.policy.keep_logits(b.context_ids, b.context_mask, protect=b.protect_mask, units=units)
            scores = unit_scores(logits.float(), units, eligible)
            loss = listwise_loss(scores, share, present & torch.isfinite(scores), c.label_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if r.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, r.max_grad_norm)
            optimizer.step()
            result.history.append({"step": step, "listwise_loss": float(loss.detach())})
            if step % r.eval_steps == 0 or step == r.steps:
                result.history.append(tracker.offer(step))
        tracker.restore()
        r.policy.eval()
        result.best_nll, result.best_step = tracker.best_nll, tracker.best_step
        return result
