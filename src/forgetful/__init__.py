"""forgetful: teach language models to forget tokens.

* Input forgetting: a learned forget mask drops context tokens so the LM reads ``b < n`` tokens
  (policies in :mod:`forgetful.masks`, ops in :mod:`forgetful.compression`, training in
  :mod:`forgetful.reinforce`).
* Loss forgetting: a per-token ``loss_mask`` decides which tokens are learned
  (:class:`SelectiveLossTrainer`, :func:`prepare_dataset_for_training`, TOFU metrics).

Imports are lazy so ``import forgetful`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "IdentityMask": "forgetful.masks",
    "RandomForgetMask": "forgetful.masks",
    "RecencyMask": "forgetful.masks",
    "SelfInformationMask": "forgetful.masks",
    "MLPForgetMask": "forgetful.masks",
    "CNNMLPForgetMask": "forgetful.masks",
    "RNNForgetMask": "forgetful.masks",
    "ForgetMask": "forgetful.masks",
    "create_random_forgetting_mask": "forgetful.compression",
    "apply_mask": "forgetful.compression",
    "reinforce_model": "forgetful.reinforce",
    "two_step_reinforce_model": "forgetful.reinforce",
    "ForgetTrainingConfig": "forgetful.reinforce",
    "SelectiveLossTrainer": "forgetful.selective",
    "SelectiveLossConfig": "forgetful.selective",
    "SelectiveLossCollator": "forgetful.selective",
    "prepare_dataset_for_training": "forgetful.tasks",
    "register_task": "forgetful.tasks",
    "ForgetfulError": "forgetful.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'forgetful' has no attribute {name!r}")


def __dir__():
    return __all__
