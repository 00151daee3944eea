"""The interface every forget-mask policy shares, and the one registry of them by name.

Every policy gives one keep-logit per context token (higher = keep):

* ``keep_logits(input_ids, attention_mask)`` -> ``[B, n]`` float32;
* ``sample(input_ids, attention_mask, forget_p=..., mode="exact"|"bernoulli", num_samples=K)`` ->
  :class:`~forgetful.input.compression.KeepSample` (keep masks ``[K, B, n]``, log-probabilities
  ``[K, B]``, entropy). Exact mode keeps exactly ``b = round((1 - forget_p) * n)`` tokens by
  Gumbel-top-k with the Plackett-Luce log-probability; Bernoulli mode keeps each token with
  probability sigmoid(logit);
* ``greedy(input_ids, attention_mask, forget_p=...)`` -> the top-``b`` keep mask.

Token 0 (the attention sink) is kept unless ``keep_first=False``; padding is never kept.

:data:`MASKS` maps each policy's ``name`` (``identity``, ``random``, ``mlp``, ``birnn``, ...) to its
class and default options; :func:`build_mask` makes one by name. The CLI, the evaluation's
baselines and ``from_pretrained`` all go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ...errors import ForgetfulError
from ..compression import KeepSample, _eligible, bernoulli_keep, budget_counts, gumbel_topk_keep, topk_keep

MODES = ("exact", "bernoulli")


@dataclass(frozen=True)
class MaskSpec:
    """A registered policy: its class and the options its name implies (``birnn``: bidirectional)."""

    cls: type[ForgetMask]
    defaults: dict = field(default_factory=dict)

    @property
    def learned(self) -> bool:
        return self.cls.learned


MASKS: dict[str, MaskSpec] = {}


def register_mask(name: str, **defaults) -> Callable[[type[ForgetMask]], type[ForgetMask]]:
    """Class decorator: make a policy available by ``name`` (with ``defaults`` for its options)."""

    def deco(cls: type[ForgetMask]) -> type[ForgetMask]:
        MASKS[name] = MaskSpec(cls, defaults)
        return cls

    return deco


def mask_names(*, learned: bool | None = None) -> list[str]:
    """Registered names, optionally only the learned (or the not-learned) ones."""
    return [n for n, spec in MASKS.items() if learned is None or spec.learned == learned]


def build_mask(
    name: str,
    model: nn.Module | None = None,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    learned: bool | None = None,
    **options,
) -> ForgetMask:
    """The policy registered as ``name``: a learned one reads ``model``'s embeddings, the
    self-information baseline scores with ``model``, the random baseline draws from a generator
    seeded with ``seed`` on ``device``. ``learned`` restricts the names accepted."""
    names = mask_names(learned=learned)
    if name not in names:
        raise ForgetfulError(f"unknown mask '{name}'; choose from {', '.join(names)}")
    spec = MASKS[name]
    return spec.cls.create(model, seed=seed, device=device, **{**spec.defaults, **options})


def attention_or_ones(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.dim() != 2:
        raise ForgetfulError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ForgetfulError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    return attention_mask.bool()


class ForgetMask(nn.Module):
    """Base class: subclasses implement :meth:`keep_logits`."""

    learned: ClassVar[bool] = False
    #: whether ``greedy`` ignores the budget and keeps every token (the identity)
    keeps_everything: ClassVar[bool] = False
    #: whether a baseline that is not learned chooses at random (a deterministic one's exact-mode
    #: "sample" is its choice, the greedy keep set, with log-probability 0)
    stochastic: ClassVar[bool] = False
    name: ClassVar[str] = "mask"

    def keep_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.keep_logits(input_ids, attention_mask)

    def _budget(self, attention_mask, forget_p, budget, keep_first, protect=None):
        if forget_p is None and budget is None:
            forget_p = getattr(self, "forget_prob", None)
        return budget_counts(attention_mask, forget_p=forget_p, budget=budget, keep_first=keep_first, protect=protect)

    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        forget_p: float | None = None,
        budget: int | torch.Tensor | None = None,
        mode: str = "exact",
        num_samples: int = 1,
        keep_first: bool = True,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        protect: torch.Tensor | None = None,
    ) -> KeepSample:
        """Sample keep masks (``[num_samples, B, n]``) with their log-probabilities. ``exact``:
        the budget from ``forget_p``/``budget``; ``bernoulli``: each token kept with
        ``sigmoid(logit)``, so the budget holds only in expectation (the trainer's penalty keeps it
        near ``forget_p``) and ``forget_p`` does not enter the sampling itself. ``protect`` marks
        tokens that are always kept and outside the budget (e.g. a question after its passage)."""
        if mode not in MODES:
            raise ForgetfulError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        attn = attention_or_ones(input_ids, attention_mask)
        eligible, forced = _eligible(attn, keep_first, protect)
        logits = self.keep_logits(input_ids, attn)
        if self.keeps_everything:
            keep = attn.unsqueeze(0).expand(num_samples, *attn.shape)
            zeros = logits.new_zeros(num_samples, attn.shape[0])
            return KeepSample(keep, zeros, zeros[0])
        if mode == "bernoulli":
            return bernoulli_keep(logits, eligible, forced, num_samples, generator, noise)
        k = self._budget(attn, forget_p, budget, keep_first, protect)
        if not self.learned and not self.stochastic:
            keep = topk_keep(logits, k, eligible, forced).unsqueeze(0).expand(num_samples, *attn.shape)
            zeros = logits.new_zeros(num_samples, attn.shape[0])
            return KeepSample(keep, zeros, zeros[0])
        return gumbel_topk_keep(logits, k, eligible, forced, num_samples, generator, noise)

    @torch.no_grad()
    def greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        forget_p: float | None = None,
        budget: int | torch.Tensor | None = None,
        keep_first: bool = True,
        protect: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The exact-budget keep mask of the ``b`` highest keep-logits (``protect``: always kept,
        outside the budget)."""
        attn = attention_or_ones(input_ids, attention_mask)
        if self.keeps_everything:
            return attn.clone()
        eligible, forced = _eligible(attn, keep_first, protect)
        k = self._budget(attn, forget_p, budget, keep_first, protect)
        return topk_keep(self.keep_logits(input_ids, attn), k, eligible, forced)

    def kept_per_row(
        self, context_length: int, *, forget_p: float | None = None, budget: int | None = None, keep_first: bool = True
    ) -> int:
        """The tokens ``greedy`` (and exact-mode ``sample``) keeps of a context of this length,
        computed on the host."""
        if self.keeps_everything:
            return context_length
        row = torch.ones(1, context_length, dtype=torch.bool)
        return int(self._budget(row, forget_p, budget, keep_first)[0])

    def extra_flops_per_token(self, context_length: int) -> float:
        """Forward FLOPs the policy adds per context token (0 for free baselines)."""
        return 0.0

    @classmethod
    def create(
        cls, model: nn.Module | None = None, *, seed: int = 0, device: torch.device | str = "cpu", **options
    ) -> ForgetMask:
        """Build from the registry (see :func:`build_mask`); policies that need the model or a
        seeded generator override this."""
        return cls(**options)
