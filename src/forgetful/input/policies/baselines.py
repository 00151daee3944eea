"""Policies that are not learned, the baselines of every report: :class:`IdentityMask` (keep
all), :class:`NoContextMask` (keep only token 0), :class:`RandomForgetMask`, :class:`RecencyMask`
(keep the last ``b``) and :class:`SelfInformationMask` (keep the tokens the LM finds least
predictable, as in Selective Context)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ForgetfulError, check_probability
from ...nll import unwrap_model
from ..compression import KeepSample, _eligible, bernoulli_keep, budget_counts, gumbel_topk_keep
from .base import MODES, ForgetMask, attention_or_ones, register_mask


@register_mask("identity")
class IdentityMask(ForgetMask):
    """Keep every token (the full-context reference)."""

    keeps_everything = True
    name = "identity"

    def keep_logits(self, input_ids, attention_mask=None):
        attn = attention_or_ones(input_ids, attention_mask)
        return torch.zeros(attn.shape, device=input_ids.device).masked_fill(~attn, float("-inf"))


@register_mask("none")
class NoContextMask(ForgetMask):
    """Forget the whole context except token 0 and protected tokens (the "no context" baseline)."""

    name = "none"

    def keep_logits(self, input_ids, attention_mask=None):
        attn = attention_or_ones(input_ids, attention_mask)
        return torch.zeros(attn.shape, device=input_ids.device).masked_fill(~attn, float("-inf"))

    def _budget(self, attention_mask, forget_p, budget, keep_first, protect=None):
        return budget_counts(attention_mask, budget=0, keep_first=keep_first, protect=protect)

    def sample(
        self, input_ids, attention_mask=None, *, mode="exact", num_samples=1, keep_first=True, protect=None, **kw
    ):
        if mode not in MODES:
            raise ForgetfulError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        attn = attention_or_ones(input_ids, attention_mask)
        _, forced = _eligible(attn, keep_first, protect)
        keep = forced.unsqueeze(0).expand(num_samples, *attn.shape)
        zeros = torch.zeros(num_samples, attn.shape[0], device=input_ids.device)
        return KeepSample(keep, zeros, zeros[0])


@register_mask("random")
class RandomForgetMask(ForgetMask):
    """Forget tokens at random: Bernoulli(``forget_prob``) per token in Bernoulli mode, a uniform
    random subset of the exact budget in exact mode and in ``greedy``."""

    name = "random"
    stochastic = True

    def __init__(self, forget_prob: float = 0.1, generator: torch.Generator | None = None):
        super().__init__()
        self.forget_prob = check_probability("forget_prob", forget_prob)
        self.generator = generator

    @classmethod
    def create(cls, model=None, *, seed=0, device="cpu", **options):
        return cls(generator=torch.Generator(device=device).manual_seed(seed), **options)

    def keep_logits(self, input_ids, attention_mask=None):
        attn = attention_or_ones(input_ids, attention_mask)
        # Random scores: top-k of i.i.d. noise is a uniform random subset of size k.
        u = torch.rand(attn.shape, generator=self.generator, device=input_ids.device)
        return u.masked_fill(~attn, float("-inf"))

    def sample(
        self,
        input_ids,
        attention_mask=None,
        *,
        forget_p=None,
        budget=None,
        mode="exact",
        num_samples=1,
        keep_first=True,
        generator=None,
        noise=None,
        protect=None,
    ):
        if mode not in MODES:
            raise ForgetfulError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        if mode == "bernoulli":
            p = self.forget_prob if forget_p is None else check_probability("forget_p", forget_p)
            attn = attention_or_ones(input_ids, attention_mask)
            eligible, forced = _eligible(attn, keep_first, protect)
            logit = math.log(max(1 - p, 1e-12)) - math.log(max(p, 1e-12))
            logits = torch.full(attn.shape, logit, device=input_ids.device)
            return bernoulli_keep(logits, eligible, forced, num_samples, generator or self.generator, noise)
        attn = attention_or_ones(input_ids, attention_mask)
        eligible, forced = _eligible(attn, keep_first, protect)
        k = self._budget(attn, forget_p, budget, keep_first, protect)
        zeros = torch.zeros(attn.shape, device=input_ids.device)
        return gumbel_topk_keep(zeros, k, eligible, forced, num_samples, generator or self.generator, noise)


@register_mask("recency")
class RecencyMask(ForgetMask):
    """Keep the most recent tokens: ``b`` in all, token 0 (when kept first) and the last ``b - 1``."""

    name = "recency"

    def keep_logits(self, input_ids, attention_mask=None):
        attn = attention_or_ones(input_ids, attention_mask)
        pos = torch.arange(attn.shape[1], device=input_ids.device, dtype=torch.float32).expand(attn.shape)
        return pos.masked_fill(~attn, float("-inf"))


@register_mask("self_information")
class SelfInformationMask(ForgetMask):
    """Keep the tokens with the highest self-information ``-log p(x_t | x_<t)`` under a causal LM
    (Selective Context, Li et al. 2023). Costs one full forward of the scoring LM."""

    name = "self_information"

    def __init__(self, scorer_model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_scorer", scorer_model)  # not a submodule: never trained or saved

    @classmethod
    def create(cls, model=None, *, seed=0, device="cpu", **options):
        if model is None:
            raise ForgetfulError("the self_information baseline needs a causal LM to score tokens with")
        return cls(model, **options)

    @torch.no_grad()
    def keep_logits(self, input_ids, attention_mask=None):
        attn = attention_or_ones(input_ids, attention_mask)
        logits = self._scorer(input_ids=input_ids, attention_mask=attn.long(), use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        surprisal = torch.cat([torch.full_like(logp[:, :1], 1e4), -logp], dim=1)
        return surprisal.masked_fill(~attn, float("-inf"))

    def extra_flops_per_token(self, context_length: int) -> float:
        from ..flops import forward_flops_per_token

        return forward_flops_per_token(unwrap_model(self._scorer).config, context_length)
