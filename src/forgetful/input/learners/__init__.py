"""Learners: three ways to fit a forget policy on a frozen LM, one interface.

Each learner takes a :class:`~.base.LearnerRun` (the policy, the LM, training and validation rows,
the keep ratio, steps, batch, learning rate) and returns a :class:`~.base.LearnerResult` (history,
the best validation NLL and its step, the LM tokens it read), keeping the version best on the
validation rows:

* ``reinforce`` (:mod:`.reinforce`): sampled keep sets, one reward each (the seed's method);
* ``relaxed`` (:mod:`.relaxed`): a relaxed keep in the LM's attention, a gradient for every token;
* ``supervised`` (:mod:`.supervised`): the oracle's keep sets of training rows as labels.

:data:`LEARNERS` names them; :func:`fit_policy` runs one by name with its options.
"""

from __future__ import annotations

from ...errors import ForgetfulError
from .base import BestOnValidation, LearnerResult, LearnerRun, training_batches
from .reinforce import ReinforceLearner
from .relaxed import RelaxedConfig, RelaxedTrainer, relaxed_keep, soft_topk
from .supervised import SupervisedConfig, SupervisedTrainer

LEARNERS = ("reinforce", "relaxed", "supervised")


def check_learners(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in LEARNERS]
    if unknown or not names:
        raise ForgetfulError(
            f"unknown learner(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(LEARNERS)}"
        )
    return names


def fit_policy(
    name: str,
    run: LearnerRun,
    *,
    training=None,
    relaxed: RelaxedConfig | None = None,
    supervised: SupervisedConfig | None = None,
    warm_rows: int = 0,
    warm_steps: int = 200,
) -> LearnerResult:
    """Fit ``run.policy`` with the learner ``name`` (``training``: the REINFORCE options, a
    :class:`~forgetful.input.reinforce_config.ForgetTrainingConfig`)."""
    check_learners([name])
    if name == "reinforce":
        from ..reinforce_config import ForgetTrainingConfig

        return ReinforceLearner(run, training or ForgetTrainingConfig(), warm_rows, warm_steps).train()
    if name == "relaxed":
        return RelaxedTrainer(run, relaxed).train()
    return SupervisedTrainer(run, supervised).train()


__all__ = [
    "LEARNERS",
    "BestOnValidation",
    "LearnerResult",
    "LearnerRun",
    "ReinforceLearner",
    "RelaxedConfig",
    "RelaxedTrainer",
    "SupervisedConfig",
    "SupervisedTrainer",
    "check_learners",
    "fit_policy",
    "relaxed_keep",
    "soft_topk",
    "training_batches",
]
