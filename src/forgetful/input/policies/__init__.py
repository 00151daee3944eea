"""Forget-mask policies: which context tokens to keep. The interface and the registry by name
(:mod:`.base`), the baselines that are not learned (:mod:`.baselines`, and the attention-score
selection of SnapKV / H2O in :mod:`.attention`) and the learned policies (:mod:`.learned`; the
residual policy over a prior in :mod:`.residual`), and the oracle, a reference that reads the
target (:mod:`.oracle`)."""

from .attention import AttentionScoreMask, GemFilterMask, SnapKVMask, attention_scores
from .base import MASKS, ForgetMask, build_mask, is_learned, mask_names, parse_strategy, query_mask, register_mask
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
from .oracle import OracleMask, keep_sets_by_units
from .residual import ResidualForgetMask

__all__ = [
    "MASKS",
    "AttentionScoreMask",
    "CNNMLPForgetMask",
    "ForgetMask",
    "GemFilterMask",
    "HiddenStateForgetMask",
    "IdentityMask",
    "LearnedForgetMask",
    "LexicalOverlapMask",
    "MLPForgetMask",
    "NoContextMask",
    "OracleMask",
    "RNNForgetMask",
    "ResidualForgetMask",
    "RandomForgetMask",
    "RecencyMask",
    "SelfInformationMask",
    "SnapKVMask",
    "attention_scores",
    "build_mask",
    "distance_buckets",
    "is_learned",
    "keep_sets_by_units",
    "lexical_scores",
    "mask_names",
    "parse_strategy",
    "query_mask",
    "register_mask",
]
