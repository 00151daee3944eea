"""Train forget masks with REINFORCE while the LM learns to read compressed context: the public
functions :func:`reinforce_model` (joint) and :func:`two_step_reinforce_model` (alternating), thin
wrappers over :class:`~.trainer.ForgetMaskTrainer` (the loop, :mod:`.trainer`) with the options of
:class:`~.reinforce_config.ForgetTrainingConfig` (:mod:`.reinforce_config`). The REINFORCE arithmetic
is :mod:`.reinforce_core`'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace

from torch import nn

from ..errors import ForgetfulError, check_probability
from .options import DEFAULT_KEEP_RATIO
from .policies import ForgetMask
from .reinforce_config import ForgetTrainingConfig, ForgetTrainingResult, check_exploration
from .trainer import ForgetMaskTrainer

__all__ = [
    "ForgetMaskTrainer",
    "ForgetTrainingConfig",
    "ForgetTrainingResult",
    "check_exploration",
    "reinforce_model",
    "two_step_reinforce_model",
]


def _with_overrides(args: ForgetTrainingConfig | None, overrides: dict) -> ForgetTrainingConfig:
    args = args or ForgetTrainingConfig()
    known = {f.name for f in fields(ForgetTrainingConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ForgetfulError(f"unknown training option(s) {', '.join(unknown)}")
    return replace(args, **overrides) if overrides else args


def _train(method, model, mask, forget_p, exploration_epochs, args, overrides, data) -> ForgetTrainingResult:
    args = _with_overrides(args, overrides)
    # the seed's public functions take the share forgotten: the one place it becomes the share kept
    keep_ratio = DEFAULT_KEEP_RATIO if forget_p is None else 1.0 - check_probability("forget_p", forget_p)
    trainer = ForgetMaskTrainer(
        model, mask, args, keep_ratio=keep_ratio, exploration_epochs=exploration_epochs, method=method, **data
    )
    return trainer.train()


def reinforce_model(
    base_llm_model: nn.Module,
    mask: ForgetMask,
    forget_p: float | None = None,
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
    policy's sample). ``forget_p``: the share of the context forgotten (default
    ``1 - DEFAULT_KEEP_RATIO``, 0.5). Returns ``(model, policy, history)``."""
    data = dict(train_dataset=train_dataset, eval_dataset=eval_dataset, tokenizer=tokenizer)
    return _train("reinforce", base_llm_model, mask, forget_p, exploration_epochs, args, overrides, data)


def two_step_reinforce_model(
    base_llm_model: nn.Module,
    mask: ForgetMask,
    forget_p: float | None = None,
    exploration_epochs: Sequence[bool] = (True, False, True, False),
    *,
    train_dataset=None,
    eval_dataset=None,
    tokenizer=None,
    args: ForgetTrainingConfig | None = None,
    **overrides,
) -> ForgetTrainingResult:
    """Alternate: ``True`` epochs train the LM on random masks (policy frozen), ``False`` epochs
    train the policy by REINFORCE (LM frozen). ``forget_p``: the share of the context forgotten
    (default ``1 - DEFAULT_KEEP_RATIO``, 0.5). Returns ``(model, policy, history)``."""
    data = dict(train_dataset=train_dataset, eval_dataset=eval_dataset, tokenizer=tokenizer)
    return _train("two_step", base_llm_model, mask, forget_p, exploration_epochs, args, overrides, data)
