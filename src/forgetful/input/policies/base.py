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

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ...errors import ForgetfulError
from ..compression import KeepSample, _eligible, bernoulli_keep, budget_counts, gumbel_topk_keep, topk_keep
from ..units import check_unit, unit_gumbel_keep, unit_ids, unit_topk_keep

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


def parse_strategy(spec: str) -> tuple[str, str]:
    """``"lexical@task"`` -> ``("lexical", "task")``; a name without ``@`` selects tokens."""
    name, _, unit = str(spec).partition("@")
    return name, check_unit(unit) if unit else "token"


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
    seeded with ``seed`` on ``device``. ``learned`` restricts the names accepted. ``name@unit``
    (``recency@sentence``, ``lexical@task``, ``random@chunk:64``) makes the policy keep whole units
    (:mod:`~forgetful.input.units`); so does the option ``unit=``."""
    name, unit = parse_strategy(name)
    names = mask_names(learned=learned)
    if name not in names:
        raise ForgetfulError(f"unknown mask '{name}'; choose from {', '.join(names)}")
    spec = MASKS[name]
    unit = options.pop("unit", None) or unit
    if spec.learned and "unit" in inspect.signature(spec.cls.__init__).parameters:
        return spec.cls.create(model, seed=seed, device=device, **{**spec.defaults, **options, "unit": unit})
    mask = spec.cls.create(model, seed=seed, device=device, **{**spec.defaults, **options})
    return mask.with_unit(unit)


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


def query_mask(attn: torch.Tensor, protect: torch.Tensor | None, window: int) -> torch.Tensor:
    """``[B, n]`` bool: the part of each row a question-aware scorer reads as its query: the
    protected tokens after the last compressible one (a question after its passage, with the
    template around it) where a row has any, else its last ``window`` real tokens (the observation
    window of SnapKV)."""
    pos = torch.arange(attn.shape[1], device=attn.device).unsqueeze(0)
    last = (pos >= attn.sum(-1, keepdim=True) - window) & attn
    if protect is None:
        return last
    protected = protect.bool() & attn
    free_end = torch.where(attn & ~protected, pos, torch.full_like(pos, -1)).max(-1, keepdim=True).values
    after = protected & (pos > free_end)
    return torch.where(after.any(-1, keepdim=True), after, last)


class ForgetMask(nn.Module):
    """Base class: subclasses implement :meth:`keep_logits`."""

    learned: ClassVar[bool] = False
    #: whether ``greedy`` ignores the budget and keeps every token (the identity)
    keeps_everything: ClassVar[bool] = False
    #: whether a baseline that is not learned chooses at random (a deterministic one's exact-mode
    #: "sample" is its choice, the greedy keep set, with log-probability 0)
    stochastic: ClassVar[bool] = False
    name: ClassVar[str] = "mask"
    #: what is kept or forgotten together (:mod:`~forgetful.input.units`); ``token`` by default
    unit: str = "token"

    def keep_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        protect: torch.Tensor | None = None,
        units: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, n]`` float keep-logit per token (``-inf`` on padding). ``protect`` marks the
        protected part of each row (a question after its passage), which question-aware policies
        read; ``units`` the row's units, which unit policies pool over."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        protect: torch.Tensor | None = None,
        units: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.keep_logits(input_ids, attention_mask, protect=protect, units=units)

    def with_unit(self, unit: str) -> ForgetMask:
        r"""Keep whole ``unit``\ s (``token``, ``sentence``, ``chunk:N``, ``task``) from now on; returns self."""
        self.unit = check_unit(unit)
        return self

    @property
    def strategy(self) -> str:
        """The name this policy is reported under: ``recency``, ``lexical@task``, ..."""
        return self.name if self.unit == "token" else f"{self.name}@{self.unit}"

    def _budget(self, attention_mask, forget_p, budget, keep_first, protect=None):
        if forget_p is None and budget is None:
            forget_p = getattr(self, "forget_prob", None)
        return budget_counts(attention_mask, forget_p=forget_p, budget=budget, keep_first=keep_first, protect=protect)

    def _units(self, units: torch.Tensor | None, attn: torch.Tensor) -> torch.Tensor | None:
        """The unit ids this policy selects by (None: tokens). ``chunk:N`` units are computed here;
        sentence and task units come with the batch (``ForgetBatch.units``)."""
        if self.unit == "token":
            return None
        if units is None:
            return unit_ids(self.unit, attn)
        if units.shape != attn.shape:
            raise ForgetfulError(f"units have shape {tuple(units.shape)} but input_ids has {tuple(attn.shape)}")
        return units.masked_fill(~attn, -1)

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
        units: torch.Tensor | None = None,
    ) -> KeepSample:
        """Sample keep masks (``[num_samples, B, n]``) with their log-probabilities. ``exact``:
        the budget from ``forget_p``/``budget``; ``bernoulli``: each token kept with
        ``sigmoid(logit)``, so the budget holds only in expectation (the trainer's penalty keeps it
        near ``forget_p``) and ``forget_p`` does not enter the sampling itself. ``protect`` marks
        tokens that are always kept and outside the budget (e.g. a question after its passage).
        ``units`` (``[B, n]`` unit ids): what a unit policy keeps whole."""
        if mode not in MODES:
            raise ForgetfulError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        attn = attention_or_ones(input_ids, attention_mask)
        logits = self.keep_logits(input_ids, attn, protect=protect, units=units)
        return self.sample_from_logits(
            logits,
            attn,
            forget_p=forget_p,
            budget=budget,
            mode=mode,
            num_samples=num_samples,
            keep_first=keep_first,
            generator=generator,
            noise=noise,
            protect=protect,
            units=units,
        )

    def sample_from_logits(
        self,
        logits: torch.Tensor,
        attn: torch.Tensor,
        *,
        forget_p: float | None = None,
        budget: int | torch.Tensor | None = None,
        mode: str = "exact",
        num_samples: int = 1,
        keep_first: bool = True,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        protect: torch.Tensor | None = None,
        units: torch.Tensor | None = None,
    ) -> KeepSample:
        """:meth:`sample` from keep-logits computed elsewhere (e.g. through a DDP wrapper)."""
        eligible, forced = _eligible(attn, keep_first, protect)
        if self.keeps_everything:
            keep = attn.unsqueeze(0).expand(num_samples, *attn.shape)
            zeros = logits.new_zeros(num_samples, attn.shape[0])
            return KeepSample(keep, zeros, zeros[0])
        units = self._units(units, attn)
        if mode == "bernoulli":
            if units is not None:
                raise ForgetfulError(f"bernoulli mode keeps tokens one by one; a {self.unit} policy needs mode exact")
            return bernoulli_keep(logits, eligible, forced, num_samples, generator, noise)
        k = self._budget(attn, forget_p, budget, keep_first, protect)
        if not self.learned and not self.stochastic:
            if units is None:
                keep = topk_keep(logits, k, eligible, forced)
            else:
                keep = unit_topk_keep(logits, units, k, eligible, forced)
            zeros = logits.new_zeros(num_samples, attn.shape[0])
            return KeepSample(keep.unsqueeze(0).expand(num_samples, *attn.shape), zeros, zeros[0])
        if units is not None:
            return unit_gumbel_keep(logits, units, k, eligible, forced, num_samples, generator, noise)
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
        units: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The exact-budget keep mask of the ``b`` highest keep-logits (``protect``: always kept,
        outside the budget; a unit policy takes whole units by mean keep-logit, the last in part)."""
        attn = attention_or_ones(input_ids, attention_mask)
        if self.keeps_everything:
            return attn.clone()
        eligible, forced = _eligible(attn, keep_first, protect)
        k = self._budget(attn, forget_p, budget, keep_first, protect)
        logits = self.keep_logits(input_ids, attn, protect=protect, units=units)
        units = self._units(units, attn)
        if units is None:
            return topk_keep(logits, k, eligible, forced)
        return unit_topk_keep(logits, units, k, eligible, forced)

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
