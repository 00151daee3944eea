"""forgetful: teach language models to forget tokens.

* Input forgetting (:mod:`forgetful.input`): a learned forget mask drops context tokens so the LM
  reads ``b < n`` tokens; policies, compression ops, REINFORCE training, evaluation.
* Loss forgetting (:mod:`forgetful.loss`): a per-token ``loss_mask`` decides which tokens are
  learned (:class:`SelectiveLossTrainer`, :func:`prepare_dataset_for_training`); the TOFU benchmark
  (:mod:`forgetful.tofu`) measures what was forgotten.
* Models and data (:mod:`forgetful.models`, :mod:`forgetful.data`) underneath; the ``forgetful``
  command (:mod:`forgetful.cli`) on top.

Imports are lazy so ``import forgetful`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ForgetMask": "forgetful.input.policies",
    "IdentityMask": "forgetful.input.policies",
    "NoContextMask": "forgetful.input.policies",
    "RandomForgetMask": "forgetful.input.policies",
    "RecencyMask": "forgetful.input.policies",
    "SelfInformationMask": "forgetful.input.policies",
    "MLPForgetMask": "forgetful.input.policies",
    "CNNMLPForgetMask": "forgetful.input.policies",
    "RNNForgetMask": "forgetful.input.policies",
    "LearnedForgetMask": "forgetful.input.policies",
    "ResidualForgetMask": "forgetful.input.policies",
    "LexicalOverlapMask": "forgetful.input.policies",
    "AttentionScoreMask": "forgetful.input.policies",
    "build_mask": "forgetful.input.policies",
    "register_mask": "forgetful.input.policies",
    "create_random_forgetting_mask": "forgetful.input.compression",
    "apply_mask": "forgetful.input.compression",
    "compress": "forgetful.input.compress",
    "generate": "forgetful.input.compress",
    "load_forget_examples": "forgetful.input.examples",
    "ForgetMaskTrainer": "forgetful.input.trainer",
    "ForgetTrainingConfig": "forgetful.input.reinforce_config",
    "reinforce_model": "forgetful.input.reinforce",
    "two_step_reinforce_model": "forgetful.input.reinforce",
    "SelectiveLossTrainer": "forgetful.loss.trainer",
    "SelectiveLossConfig": "forgetful.loss.trainer",
    "SelectiveLossCollator": "forgetful.loss.trainer",
    "prepare_dataset_for_training": "forgetful.loss.tasks",
    "register_task": "forgetful.loss.tasks",
    "load_model": "forgetful.models.loading",
    "ForgetfulError": "forgetful.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'forgetful' has no attribute {name!r}")


def __dir__():
    return __all__
