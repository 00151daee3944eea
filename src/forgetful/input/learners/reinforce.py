"""REINFORCE, the seed's learner, as one learner among three: the policy samples ``K`` keep sets
per row (Plackett-Luce over its units, exact budget), the frozen LM scores each by the target's NLL,
and the policy follows ``-(r - b) grad log pi`` with the leave-one-out baseline
(:mod:`~forgetful.input.reinforce_core`, in :class:`~forgetful.input.trainer.ForgetMaskTrainer` with
the LM frozen). An optional warm start first fits the policy to leave-one-unit-out labels
(:mod:`~forgetful.input.supervision`). The LM reads ``K`` compressed rows forward per training row.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..compression import kept_counts
from ..evaluation import batches_of
from ..reinforce_config import ForgetTrainingConfig, row_lengths
from ..supervision import warm_start
from ..trainer import ForgetMaskTrainer
from .base import LearnerResult, LearnerRun


class ReinforceLearner:
    """Warm start (``warm_rows`` rows labelled, ``warm_steps`` steps; 0 rows: none), then
    REINFORCE for ``run.steps`` steps at a constant learning rate, with ``training``'s REINFORCE
    options (``num_samples``, ``baseline``, ``entropy_coef``, ...); the best version on the
    validation rows is kept (the policy as it starts included)."""

    def __init__(self, run: LearnerRun, training: ForgetTrainingConfig, warm_rows: int = 0, warm_steps: int = 200):
        self.run, self.training, self.warm_rows, self.warm_steps = run, training, warm_rows, warm_steps

    def train(self) -> LearnerResult:
        r = self.run
        result = LearnerResult()
        if self.warm_rows and r.policy.unit != "token":
            rows = r.train.shuffle(seed=r.seed).select(range(min(self.warm_rows, len(r.train))))
            warm = warm_start(
                r.policy,
                r.lm,
                batches_of(rows, r.batch_size, r.pad_token_id),
                pad_token_id=r.pad_token_id,
                steps=self.warm_steps,
                learning_rate=r.learning_rate,
                device=r.device,
                autocast=r.autocast,
                progress=r.progress,
            )
            result.history += warm.history
            result.extra.update(
                warm_rows=warm.rows, seconds_warm_start=round(warm.seconds_labels + warm.seconds_fit, 1)
            )
        per_epoch = max(1, len(r.train) // r.batch_size)
        epochs = math.ceil(r.steps / per_epoch)
        args = replace(
            self.training,
            output_dir=None,
            run_name="policy",
            freeze_lm=True,
            freeze_policy=False,
            keep_best=True,
            eval_baselines=False,
            eval_steps=r.eval_steps,
            eval_batches=math.ceil(len(r.val) / r.batch_size),
            logging_steps=1,
            lr_scheduler_type="constant",  # constant after the warm-up: REINFORCE keeps learning to the end
            max_steps_per_epoch=math.ceil(r.steps / epochs),
            per_device_train_batch_size=r.batch_size,
            gradient_accumulation_steps=1,
            policy_learning_rate=r.learning_rate,
            seed=r.seed,
            disable_tqdm=not r.progress,
        )
        trainer = ForgetMaskTrainer(
            r.lm,
            r.policy,
            args,
            keep_ratio=r.keep_ratio,
            exploration_epochs=[0.0] * epochs,
            train_dataset=r.train,
            eval_dataset=r.val,
        )
        _, policy, steps = trainer.train()
        result.history += steps
        result.best_nll, result.best_step = trainer.state.best_nll, trainer.state.best_step or 0
        n, m = row_lengths(r.train, "context_ids").float(), row_lengths(r.train, "target_ids").float()
        kept = kept_counts(n.long(), keep_ratio=r.keep_ratio, keep_first=r.keep_first).float()
        per_row = float((kept + m).mean())
        result.lm_tokens_forward = round(trainer.total_steps * trainer.rows_per_step * args.num_samples * per_row)
        result.extra.update(num_samples=args.num_samples, steps=trainer.total_steps)
        for p in policy.parameters():
            p.requires_grad_(False)
        return result
