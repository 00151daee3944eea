"""Forget-mask policies: which context tokens to keep. The interface and the registry by name
(:mod:`.base`), the baselines that are not learned (:mod:`.baselines`, and the attention-score
selection of SnapKV / H2O in :mod:`.attention`) and the learned policies (:mod:`.learned`)."""

from .attention import AttentionScoreMask, attention_scores
from .base import MASKS, ForgetMask, build_mask, mask_names, register_mask
from .baselines import IdentityMask, NoContextMask, RandomForgetMask, RecencyMask, SelfInformationMask
from .learned import (
    CNNMLPForgetMask,
    HiddenStateForgetMask,
    LearnedForgetMask,
    MLPForgetMask,
    RNNForgetMask,
    distance_buckets,
)

__all__ = [
    "MASKS",
    "AttentionScoreMask",
    "CNNMLPForgetMask",
    "ForgetMask",
    "HiddenStateForgetMask",
    "IdentityMask",
    "LearnedForgetMask",
    "MLPForgetMask",
    "NoContextMask",
    "RNNForgetMask",
    "RandomForgetMask",
    "RecencyMask",
    "SelfInformationMask",
    "attention_scores",
    "build_mask",
    "distance_buckets",
    "mask_names",
    "register_mask",
]
