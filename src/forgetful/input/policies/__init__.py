"""Forget-mask policies: which context tokens to keep. The interface and the registry by name
(:mod:`.base`), the baselines that are not learned (:mod:`.baselines`) and the learned policies
(:mod:`.learned`)."""

from .base import MASKS, ForgetMask, build_mask, mask_names, register_mask
from .baselines import IdentityMask, NoContextMask, RandomForgetMask, RecencyMask, SelfInformationMask
from .learned import CNNMLPForgetMask, LearnedForgetMask, MLPForgetMask, RNNForgetMask, distance_buckets

__all__ = [
    "MASKS",
    "CNNMLPForgetMask",
    "ForgetMask",
    "IdentityMask",
    "LearnedForgetMask",
    "MLPForgetMask",
    "NoContextMask",
    "RNNForgetMask",
    "RandomForgetMask",
    "RecencyMask",
    "SelfInformationMask",
    "build_mask",
    "distance_buckets",
    "mask_names",
    "register_mask",
]
