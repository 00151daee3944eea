"""Forget-mask policies: which context tokens to keep. The interface and the registry by name
(:mod:`.base`), the baselines that are not learned (:mod:`.baselines`, and the attention-score
selection of SnapKV / H2O in :mod:`.attention`) and the learned policies (:mod:`.learned`; the
residual policy over a prior in :mod:`.residual`)."""

from .attention import AttentionScoreMask, attention_scores
from .base import MASKS, ForgetMask, build_mask, mask_names, parse_strategy, query_mask, register_mask
from .baselines import (
    IdentityMask,
    LexicalOverlapMask,
    NoContextMask,
    RandomForgetMask,
    RecencyMask,
    SelfInformationMask,
    lexical_scores,
)
from .learned import (
    CNNMLPForgetMask,
    HiddenStateForgetMask,
    LearnedForgetMask,
    MLPForgetMask,
    RNNForgetMask,
    distance_buckets,
)
from .residual import ResidualForgetMask

__all__ = [
    "MASKS",
    "AttentionScoreMask",
    "CNNMLPForgetMask",
    "ForgetMask",
    "HiddenStateForgetMask",
    "IdentityMask",
    "LearnedForgetMask",
    "LexicalOverlapMask",
    "MLPForgetMask",
    "NoContextMask",
    "RNNForgetMask",
    "ResidualForgetMask",
    "RandomForgetMask",
    "RecencyMask",
    "SelfInformationMask",
    "attention_scores",
    "build_mask",
    "distance_buckets",
    "lexical_scores",
    "mask_names",
    "parse_strategy",
    "query_mask",
    "register_mask",
]
