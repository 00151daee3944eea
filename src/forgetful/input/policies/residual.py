"""The residual policy: a learned correction over a prior, keeping whole units, reading the question.

``logit = prior_scale * exp(s) * standardise(prior) + correction``: the prior is a registered
baseline's score, the correction an MLP whose last layer starts at zero, so an untrained policy
ranks exactly as its prior does and training starts from the best heuristic (DESIGN: "be a
residual over a prior"). What it reads and how it pools over units: :class:`ResidualForgetMask`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ForgetfulError
from ...models.layers import num_layers
from ...nll import unwrap_model
from .base import attention_or_ones, parse_strategy, query_mask, register_mask
from .learned import LearnedForgetMask, distance_buckets


def standardise(scores: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """Per row, ``(score - mean) / std`` over the tokens in ``among``, bounded to [-50, 50] (a
    kept-first token scores ~1e4 raw and stays on top); 0 where a score is not finite. Monotone in
    the score, so it keeps every ranking among the tokens it does not bound."""
    finite = torch.isfinite(scores)
    w = (among & finite).float()
    x = torch.where(finite, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
    n = w.sum(-1, keepdim=True).clamp(min=1)
    mean = (x * w).sum(-1, keepdim=True) / n
    std = (((x - mean) ** 2 * w).sum(-1, keepdim=True) / n).sqrt().clamp(min=1e-3)
    return torch.where(finite, ((x - mean) / std).clamp(-50, 50), torch.zeros_like(x))


# prior scorers a residual policy can start from: baselines that rank tokens by a score
PRIORS = ("recency", "lexical", "attention_score", "self_information")


@register_mask("residual")
class ResidualForgetMask(LearnedForgetMask):
    """A learned correction over a prior, keeping whole units, reading the question.

    ``logit = prior_scale * exp(s) * standardise(prior) + correction``, where ``prior`` is a
    registered baseline's score (``recency``, ``lexical``, ``attention_score``,
    ``self_information``), ``s`` a learned log-scale (0 at first) and the correction an MLP whose
    last layer starts at zero: an untrained policy ranks exactly as its prior does, so training can
    only start from the best heuristic. It keeps ``unit``\\ s (``sentence``, ``task``, ``chunk:N`` or
    ``token``; a unit's logit is its tokens' mean).

    What the correction reads, per token: the base LM's hidden state after its first ``layer``
    layers (default 4, or all of a shallower model; one truncated forward over the whole row,
    question included; ``layer=0``: the input embeddings), the token's distance to the end, the standardised scores of the cheap priors
    (recency, lexical overlap, the attention the question pays the token in those early layers) and
    of the chosen prior, and a cross-attention from the token to the question's tokens at that layer
    (the question: the protected part of the row after the passage, else the last ``window``
    tokens). Token features are also averaged over the token's unit, so a unit is judged as a whole.
    """

    name = "residual"
    N_SCALARS = 4

    def __init__(
        self,
        base_llm_model=None,
        prior: str = "lexical",
        unit: str = "sentence",
        layer: int | None = None,
        window: int = 32,
        prior_scale: float = 2.0,
        **kw,
    ):
        super().__init__(base_llm_model, **kw)
        if parse_strategy(prior).name not in PRIORS:  # a prior with options: lexical:rounds=2
            raise ForgetfulError(
                f"prior must be one of {', '.join(PRIORS)} (with options: lexical:rounds=2), got '{prior}'"
            )
        if layer is None:  # the default: 4 layers, or every layer of a shallower model
            layer = min(4, num_layers(base_llm_model)) if base_llm_model is not None else 4
        if layer < 0 or window < 1:
            raise ForgetfulError(f"layer must be >= 0 and window >= 1, got layer={layer}, window={window}")
        if base_llm_model is not None and layer > num_layers(base_llm_model):
            raise ForgetfulError(f"layer {layer} is past the model's {num_layers(base_llm_model)} layers")
        if prior_scale <= 0:
            raise ForgetfulError(f"prior_scale must be positive, got {prior_scale}")
        self.prior, self.layer, self.window, self.prior_scale = prior, layer, window, float(prior_scale)
        self.with_unit(unit)
        h = self.hidden_size
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.scalars = nn.Linear(self.N_SCALARS, h)
        self.query_proj, self.key_proj, self.value_proj = (nn.Linear(h, h) for _ in range(3))
        self.head = nn.Sequential(nn.Linear(6 * h, h), nn.GELU(), nn.Linear(h, 1))
        nn.init.zeros_(self.head[-1].weight)  # the correction starts at exactly 0
        nn.init.zeros_(self.head[-1].bias)
        self._attach_base(base_llm_model)

    def _attach_base(self, base_llm_model) -> None:
        from .base import build_mask

        object.__setattr__(self, "_base", base_llm_model)  # not a submodule: not trained, not saved
        scorer = None
        name = parse_strategy(self.prior).name
        if base_llm_model is not None or name in ("recency", "lexical"):  # these two need no model
            question_aware = name in ("lexical", "attention_score")  # they read the same query
            options = {"window": self.window} if question_aware else {}
            scorer = build_mask(self.prior, base_llm_model, learned=False, **options).with_unit(self.unit)
        object.__setattr__(self, "_prior", scorer)

    def _extra_config(self):
        return {
            "prior": self.prior,
            "unit": self.unit,
            "layer": self.layer,
            "window": self.window,
            "prior_scale": self.prior_scale,
        }

    def attach(self, base_llm_model: nn.Module) -> LearnedForgetMask:
        super().attach(base_llm_model)
        self._attach_base(base_llm_model)
        return self

    def prior_logits(self, input_ids, attn, protect=None, units=None) -> torch.Tensor:
        """What the policy equals before training: ``prior_scale * standardise(prior)``."""
        query = query_mask(attn, protect, self.window)
        return self.prior_scale * self._standardised_prior(input_ids, attn, protect, query, units)

    def _candidates(self, attn, protect, query) -> torch.Tensor:
        pos = torch.arange(attn.shape[1], device=attn.device).unsqueeze(0)
        cand = attn & ~query & (pos > 0)
        return cand if protect is None else cand & ~protect.bool()

    @torch.no_grad()
    def _standardised_prior(self, input_ids, attn, protect, query, units=None) -> torch.Tensor:
        if self._prior is None:
            raise ForgetfulError("the policy has no base model: call policy.attach(model) first")
        raw = self._prior.keep_logits(input_ids, attn, protect=protect, units=units)  # units: two-round lexical
        return standardise(raw, self._candidates(attn, protect, query))

    @torch.no_grad()
    def _inputs(self, input_ids, attn, protect, query, units=None):
        """Detached per-token inputs: hidden states ``[B, n, d]``, scalar features ``[B, n, 4]`` and
        the standardised prior ``[B, n]``."""
        from .attention import early_features
        from .baselines import lexical_scores

        if self._base is None or self._embeddings is None:
            raise ForgetfulError("the policy has no base model: call policy.attach(model) first")
        if self.layer == 0:
            hidden = self._embeddings(input_ids)
            attended = torch.zeros(attn.shape, device=input_ids.device)
        else:
            hidden, attended = early_features(self._base, input_ids, attn, self.layer, query)
        cand = self._candidates(attn, protect, query)
        pos = torch.arange(attn.shape[1], device=attn.device, dtype=torch.float32).expand(attn.shape)
        prior = self._standardised_prior(input_ids, attn, protect, query, units)
        scalars = torch.stack(
            [
                prior,
                standardise(lexical_scores(input_ids, attn, query), cand),
                standardise(torch.log1p(attended.float()), cand),
                standardise(pos, cand),
            ],
            dim=-1,
        ).clamp(-10, 10)  # a kept-first query token scores ~1e4 raw: bounded features
        return hidden, scalars, prior

    def keep_logits(self, input_ids, attention_mask=None, *, protect=None, units=None):
        attn = attention_or_ones(input_ids, attention_mask)
        query = query_mask(attn, protect, self.window)
        hidden, scalars, prior = self._inputs(input_ids, attn, protect, query, units)
        dtype = self.proj.weight.dtype
        lengths = attn.sum(-1, keepdim=True)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        dist = distance_buckets(lengths - 1 - pos, self.num_distance_buckets, self.max_distance)
        x = self.proj(self.norm(hidden.to(dtype))) + self.distance(dist) + self.scalars(scalars.to(dtype))
        x = x * attn.unsqueeze(-1).to(x.dtype)  # padding carries nothing
        asked = _cross_attend(self.query_proj(x), self.key_proj(x), self.value_proj(x), query, self.hidden_size)
        feats = torch.cat([x, asked, x * asked], dim=-1)
        eligible = attn & ~query
        unit_of = self.resolve_units(units, attn)
        pooled = feats if unit_of is None else _unit_mean(feats, unit_of, eligible)
        correction = self.head(torch.cat([feats, pooled], dim=-1)).squeeze(-1).float()
        scale = self.prior_scale * torch.exp(self.log_scale.float())
        logits = scale * prior + correction
        return logits.masked_fill(~attn, float("-inf"))

    def scorer_layers(self) -> int:
        return max(self.layer, self._prior.scorer_layers() if self._prior is not None else 0)

    def extra_flops_per_token(self, context_length: int) -> float:
        from ..flops import forward_flops

        own = 2.0 * sum(p.numel() for n, p in self.named_parameters() if not n.startswith("distance."))
        own += 6.0 * self.hidden_size * min(self.window, context_length)  # the cross-attention
        body = 0.0
        if self.layer and self._base is not None:
            base = unwrap_model(self._base)
            body = forward_flops(base.config, context_length, logit_positions=0) * self.layer / num_layers(base)
            body /= max(context_length, 1)
        prior = self._prior.extra_flops_per_token(context_length) if self._prior is not None else 0.0
        return own + body + prior


def _cross_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query: torch.Tensor, dim: int) -> torch.Tensor:
    """Every token attends over its row's query tokens only (one head): ``[B, n, h]``. The query
    tokens are gathered first (one read-back: their largest count), so this costs ``n x Q``."""
    count = query.sum(-1)
    width = max(int(count.max()), 1)
    at = torch.argsort((~query).to(torch.uint8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=query.device).unsqueeze(0) < count.unsqueeze(1)
    keys = k.gather(1, at.unsqueeze(-1).expand(-1, -1, k.shape[-1]))
    values = v.gather(1, at.unsqueeze(-1).expand(-1, -1, v.shape[-1]))
    scores = (q @ keys.transpose(1, 2)) / math.sqrt(dim)
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(v.dtype)  # a row without query: zeros
    return weights @ values


def _unit_mean(feats: torch.Tensor, units: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Each token's features replaced by the mean over the eligible tokens of its unit (tokens in
    no unit keep their own)."""
    inside = eligible & (units >= 0)
    slots = torch.where(inside, units, torch.zeros_like(units)).unsqueeze(-1).expand_as(feats)
    w = inside.unsqueeze(-1).to(feats.dtype)
    sums = torch.zeros_like(feats).scatter_add(1, slots, feats * w)
    counts = torch.zeros_like(feats[..., :1]).scatter_add(1, slots[..., :1], w)
    mean = (sums / counts.clamp(min=1)).gather(1, slots)
    return torch.where(inside.unsqueeze(-1), mean, feats)
