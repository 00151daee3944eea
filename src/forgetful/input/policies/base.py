"""The interface every forget-mask policy shares, and the one registry of them by name.

Every policy gives one keep-logit per context token (higher = keep):

* ``keep_logits(input_ids, attention_mask)`` -> ``[B, n]`` float32;
* ``sample(input_ids, attention_mask, keep_ratio=..., mode="exact"|"bernoulli", num_samples=K)`` ->
  :class:`~forgetful.input.compression.KeepSample` (keep masks ``[K, B, n]``, log-probabilities
  ``[K, B]``, entropy). Exact mode keeps exactly ``b = round(keep_ratio * n)`` tokens by
  Gumbel-top-k with the Plackett-Luce log-probability; Bernoulli mode keeps each token with
  probability sigmoid(logit);
* ``greedy(input_ids, attention_mask, keep_ratio=...)`` -> the top-``b`` keep mask.

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
from ..compression import KeepSample, bernoulli_keep, budget_counts, eligible_tokens, gumbel_topk_keep, topk_keep
from ..strategy import StrategySpec, parse_strategy
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


def _saved_policy_class(folder: str) -> type[ForgetMask]:
    """The registered class of the policy saved in ``folder`` (its ``from_pretrained`` checks the rest)."""
    import json
    from pathlib import Path

    try:
        name = json.loads((Path(folder) / "policy_config.json").read_text(encoding="utf-8")).get("policy_type")
    except (OSError, ValueError, AttributeError):
        raise ForgetfulError(f"{folder}/policy_config.json is not a saved policy's config (valid JSON?)") from None
    if name not in MASKS or not MASKS[name].learned:
        raise ForgetfulError(f"{folder}: unknown policy_type {name!r}; known: {', '.join(mask_names(learned=True))}")
    return MASKS[name].cls


def is_learned(strategy: str | StrategySpec) -> bool:
    """Whether a strategy name is a learned policy (a registered learned name, or a saved policy)."""
    spec = parse_strategy(strategy)
    return spec.path is not None or (spec.name in MASKS and MASKS[spec.name].learned)


def _accepted_options(cls: type) -> set[str] | None:
    """The keyword options a policy class takes (its ``__init__`` and, through ``**kw``, its
    parents'); None when some class takes any."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {"self", "base_llm_model", "scorer_model", "generator"}
    return None


def build_mask(
    name: str | StrategySpec,
    model: nn.Module | None = None,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    learned: bool | None = None,
    **options,
) -> ForgetMask:
    """The policy a strategy names (:mod:`~forgetful.input.strategy`'s grammar,
    ``name[:key=value,...][@unit]``, or a saved policy's folder): a learned one reads ``model``'s
    embeddings, the scorers (self-information, attention, the oracle) score with ``model``, the
    random baseline draws from a generator seeded with ``seed`` on ``device``. ``learned``
    restricts the names accepted. ``@unit`` (or the option ``unit=``) makes the policy keep whole
    units (:mod:`~forgetful.input.units`); the option ``forget_layer=L`` drops the forgotten tokens
    after layer ``L`` instead of at the input (:mod:`~forgetful.input.depth`). Keyword ``options``
    win over the ones in the name."""
    spec = parse_strategy(name)
    given = dict(spec.options)
    merged = {**spec.kwargs, **options}
    forget_layer = merged.pop("forget_layer", 0)
    unit = merged.pop("unit", None) or spec.unit
    if spec.path is not None:
        if learned is False:
            raise ForgetfulError(f"strategy '{spec}' is a learned policy; a baseline is expected here")
        if merged:
            raise ForgetfulError(
                f"a saved policy ({spec.path}) takes only forget_layer and @unit, got {sorted(merged)}"
            )
        mask = _saved_policy_class(spec.path).from_pretrained(spec.path, model)
        if unit != "token":
            mask.with_unit(unit)
    else:
        names = mask_names(learned=learned)
        if spec.name not in names:
            raise ForgetfulError(f"unknown strategy '{spec.name}'; choose from {', '.join(names)} (or a policy folder)")
        entry = MASKS[spec.name]
        accepted = _accepted_options(entry.cls)
        unknown = sorted(set(merged) - accepted) if accepted is not None else []
        if unknown:
            raise ForgetfulError(
                f"strategy '{spec}': {spec.name} has no option {', '.join(unknown)}; "
                f"its options: {', '.join(sorted(accepted | {'forget_layer'})) or 'forget_layer'}"
            )
        kwargs = {**entry.defaults, **merged}
        if entry.learned and "unit" in inspect.signature(entry.cls.__init__).parameters:
            mask = entry.cls.create(model, seed=seed, device=device, **kwargs, unit=unit)
        else:
            try:
                mask = entry.cls.create(model, seed=seed, device=device, **kwargs)
            except TypeError as exc:
                raise ForgetfulError(f"strategy '{spec}': {exc}") from None
            mask.with_unit(unit)
    if isinstance(forget_layer, bool) or not isinstance(forget_layer, int) or forget_layer < 0:
        raise ForgetfulError(f"strategy '{spec}': forget_layer must be a layer count >= 0, got {forget_layer!r}")
    mask.forget_layer = forget_layer
    mask.spec_options = tuple((k, v) for k, v in sorted(given.items()) if k != "forget_layer")
    return mask


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
    #: drop the forgotten tokens after this many layers (0: at the input; :mod:`~forgetful.input.depth`)
    forget_layer: int = 0
    #: the options its strategy name gave (reported in :attr:`strategy`)
    spec_options: tuple = ()
    #: a reference that reads the target (the oracle): scored apart, never a baseline
    reads_target: ClassVar[bool] = False

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
        """The name this policy is reported under, in the strategy grammar: ``recency``,
        ``lexical@task``, ``snapkv:layer=4@sentence``, ``recency:forget_layer=8``, ..."""
        options = dict(self.spec_options)
        if self.forget_layer:
            options["forget_layer"] = self.forget_layer
        return str(StrategySpec(self.name, tuple(sorted(options.items())), self.unit))

    def _budget(self, attention_mask, keep_ratio, budget, keep_first, protect=None):
        if keep_ratio is None and budget is None and getattr(self, "forget_prob", None) is not None:
            keep_ratio = 1.0 - self.forget_prob  # the random baseline's own share
        return budget_counts(
            attention_mask, keep_ratio=keep_ratio, budget=budget, keep_first=keep_first, protect=protect
        )

    def resolve_units(self, units: torch.Tensor | None, attn: torch.Tensor) -> torch.Tensor | None:
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
        keep_ratio: float | None = None,
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
        the budget from ``keep_ratio``/``budget``; ``bernoulli``: each token kept with
        ``sigmoid(logit)``, so the budget holds only in expectation (the trainer's penalty keeps it
        near ``keep_ratio``) and ``keep_ratio`` does not enter the sampling itself. ``protect`` marks
        tokens that are always kept and outside the budget (e.g. a question after its passage).
        ``units`` (``[B, n]`` unit ids): what a unit policy keeps whole."""
        if mode not in MODES:
            raise ForgetfulError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        attn = attention_or_ones(input_ids, attention_mask)
        logits = self.keep_logits(input_ids, attn, protect=protect, units=units)
        return self.sample_from_logits(
            logits,
            attn,
            keep_ratio=keep_ratio,
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
        keep_ratio: float | None = None,
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
        eligible, forced = eligible_tokens(attn, keep_first, protect)
        if self.keeps_everything:
            keep = attn.unsqueeze(0).expand(num_samples, *attn.shape)
            zeros = logits.new_zeros(num_samples, attn.shape[0])
            return KeepSample(keep, zeros, zeros[0])
        units = self.resolve_units(units, attn)
        if mode == "bernoulli":
            if units is not None:
                raise ForgetfulError(f"bernoulli mode keeps tokens one by one; a {self.unit} policy needs mode exact")
            return bernoulli_keep(logits, eligible, forced, num_samples, generator, noise)
        k = self._budget(attn, keep_ratio, budget, keep_first, protect)
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
        keep_ratio: float | None = None,
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
        eligible, forced = eligible_tokens(attn, keep_first, protect)
        k = self._budget(attn, keep_ratio, budget, keep_first, protect)
        logits = self.keep_logits(input_ids, attn, protect=protect, units=units)
        units = self.resolve_units(units, attn)
        if units is None:
            return topk_keep(logits, k, eligible, forced)
        return unit_topk_keep(logits, units, k, eligible, forced)

    def kept_per_row(
        self,
        context_length: int,
        *,
        keep_ratio: float | None = None,
        budget: int | None = None,
        keep_first: bool = True,
    ) -> int:
        """The tokens ``greedy`` (and exact-mode ``sample``) keeps of a context of this length,
        computed on the host."""
        if self.keeps_everything:
            return context_length
        row = torch.ones(1, context_length, dtype=torch.bool)
        return int(self._budget(row, keep_ratio, budget, keep_first)[0])

    def extra_flops_per_token(self, context_length: int) -> float:
        """Forward FLOPs the policy adds per context token (0 for free baselines)."""
        return 0.0

    def scorer_layers(self) -> int:
        """How many of the LM's first decoder layers its scoring runs over the context (0: none).
        Forgetting at depth after as many layers or more computes them anyway: a pipeline that reuses
        them pays nothing for them."""
        return 0

    @classmethod
    def create(
        cls, model: nn.Module | None = None, *, seed: int = 0, device: torch.device | str = "cpu", **options
    ) -> ForgetMask:
        """Build from the registry (see :func:`build_mask`); policies that need the model or a
        seeded generator override this."""
        return cls(**options)
