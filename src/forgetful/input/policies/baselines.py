"""Policies that are not learned, the baselines of every report: :class:`IdentityMask` (keep
all), :class:`NoContextMask` (keep only token 0), :class:`RandomForgetMask`, :class:`RecencyMask`
(keep the last ``b``), :class:`LexicalOverlapMask` (keep what shares rare words with the question)
and :class:`SelfInformationMask` (keep the tokens the LM finds least predictable, as in Selective
Context). Each also works on units (``recency@sentence``, ``lexical@task``): a unit's score is the
mean of its tokens'."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ForgetfulError, check_probability
from ...nll import unwrap_model
from ..compression import KeepSample, bernoulli_keep, budget_counts, eligible_tokens
from ..units import unit_ids, unit_scores
from .base import MODES, ForgetMask, attention_or_ones, query_mask, register_mask


@register_mask("identity")
class IdentityMask(ForgetMask):
    """Keep every token (the full-context reference)."""

    keeps_everything = True
    name = "identity"

    def keep_logits(self, input_ids, attention_mask=None, *, protect=None, units=None):
        attn = attention_or_ones(input_ids, attention_mask)
        return torch.zeros(attn.shape, device=input_ids.device).masked_fill(~attn, float("-inf"))


@register_mask("none")
class NoContextMask(ForgetMask):
    """Forget the whole context except token 0 and protected tokens (the "no context" baseline)."""

    name = "none"

    def keep_logits(self, input_ids, attention_mask=None, *, protect=None, units=None):
        attn = attention_or_ones(input_ids, attention_mask)
        return torch.zeros(attn.shape, device=input_ids.device).masked_fill(~attn, float("-inf"))

    def _budget(self, attention_mask, keep_ratio, budget, keep_first, protect=None):
        return budget_counts(attention_mask, budget=0, keep_first=keep_first, protect=protect)

    def sample(
        self, input_ids, attention_mask=None, *, mode="exact", num_samples=1, keep_first=True, protect=None, **kw
    ):
        if mode not in MODES:
            raise ForgetfulError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        attn = attention_or_ones(input_ids, attention_mask)
        _, forced = eligible_tokens(attn, keep_first, protect)
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

    def keep_logits(self, input_ids, attention_mask=None, *, protect=None, units=None):
        attn = attention_or_ones(input_ids, attention_mask)
        # Random scores: top-k of i.i.d. noise is a uniform random subset of size k.
        u = torch.rand(attn.shape, generator=self.generator, device=input_ids.device)
        return u.masked_fill(~attn, float("-inf"))

    def sample(
        self,
        input_ids,
        attention_mask=None,
        *,
        keep_ratio=None,
        budget=None,
        mode="exact",
        num_samples=1,
        keep_first=True,
        generator=None,
        noise=None,
        protect=None,
        units=None,
    ):
        if mode not in MODES:
            raise ForgetfulError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        if mode == "bernoulli" and self.unit == "token":
            p = self.forget_prob if keep_ratio is None else 1.0 - check_probability("keep_ratio", keep_ratio)
            attn = attention_or_ones(input_ids, attention_mask)
            eligible, forced = eligible_tokens(attn, keep_first, protect)
            logit = math.log(max(1 - p, 1e-12)) - math.log(max(p, 1e-12))
            logits = torch.full(attn.shape, logit, device=input_ids.device)
            return bernoulli_keep(logits, eligible, forced, num_samples, generator or self.generator, noise)
        attn = attention_or_ones(input_ids, attention_mask)
        # a uniform random subset (of tokens, or of units filling the budget): equal logits
        zeros = torch.zeros(attn.shape, device=input_ids.device)
        return self.sample_from_logits(
            zeros,
            attn,
            keep_ratio=keep_ratio,
            budget=budget,
            mode=mode,
            num_samples=num_samples,
            keep_first=keep_first,
            generator=generator or self.generator,
            noise=noise,
            protect=protect,
            units=units,
        )


@register_mask("recency")
class RecencyMask(ForgetMask):
    """Keep the most recent tokens: ``b`` in all, token 0 (when kept first) and the last ``b - 1``."""

    name = "recency"

    def keep_logits(self, input_ids, attention_mask=None, *, protect=None, units=None):
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
    def keep_logits(self, input_ids, attention_mask=None, *, protect=None, units=None):
        attn = attention_or_ones(input_ids, attention_mask)
        logits = self._scorer(input_ids=input_ids, attention_mask=attn.long(), use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        surprisal = torch.cat([torch.full_like(logp[:, :1], 1e4), -logp], dim=1)
        return surprisal.masked_fill(~attn, float("-inf"))

    def extra_flops_per_token(self, context_length: int) -> float:
        from ..flops import forward_flops_per_token

        return forward_flops_per_token(unwrap_model(self._scorer).config, context_length)

    def scorer_layers(self) -> int:
        from ...models.layers import num_layers

        return num_layers(self._scorer)


@register_mask("lexical")
class LexicalOverlapMask(ForgetMask):
    """Keep what shares rare tokens with the question, BM25-style: a context token scores the
    inverse document frequency of its id when the id occurs in the query, else 0. The query is the
    protected part of the row (the question after a passage) or, where nothing is protected, its
    last ``window`` tokens (the observation window). Documents are runs of ``doc_tokens`` context
    tokens (``D`` of them, at least one), and ``idf = log(1 + (D - f + 0.5) / (f + 0.5))`` with ``f``
    the id's count in the context, at most ``D`` (so words in every run, such as "the", weigh ~0). Ties (most tokens score 0) go to the more recent
    token; the query itself is kept first. A unit's score is its tokens' mean: density of rare shared
    words, as BM25 normalises by length. Costs nothing but a few scatters.

    ``rounds=2`` (``lexical:rounds=2@task``) reads the question, then what it found: the
    ``seed_units`` best units of the first round join the query (and are kept first) and every other
    unit is scored again against the question and them; so the second hop of a question whose
    bridge entity is not in the question can be found (token-level: seeds are chunks of 16 tokens)."""

    name = "lexical"

    def __init__(
        self,
        window: int = 32,
        doc_tokens: int = 32,
        vocab_size: int | None = None,
        rounds: int = 1,
        seed_units: int = 2,
    ):
        super().__init__()
        if window < 1 or doc_tokens < 1 or rounds < 1 or seed_units < 1:
            raise ForgetfulError(
                f"lexical: window, doc_tokens, rounds and seed_units must be at least 1, got {window}, {doc_tokens}, "
                f"{rounds}, {seed_units}"
            )
        self.window, self.doc_tokens, self.vocab_size = window, doc_tokens, vocab_size
        self.rounds, self.seed_units = rounds, seed_units

    @classmethod
    def create(cls, model=None, *, seed=0, device="cpu", **options):
        config = getattr(unwrap_model(model), "config", None) if model is not None else None
        options.setdefault("vocab_size", getattr(config, "vocab_size", None))
        return cls(**options)

    def keep_logits(self, input_ids, attention_mask=None, *, protect=None, units=None):
        attn = attention_or_ones(input_ids, attention_mask)
        query = query_mask(attn, protect, self.window)
        scores = lexical_scores(input_ids, attn, query, self.doc_tokens, self.vocab_size)
        if self.rounds > 1:
            slots = self.resolve_units(units, attn) if self.unit != "token" else unit_ids("chunk:16", attn)
        for _ in range(self.rounds - 1):
            context = attn & ~query & (slots >= 0)
            per_unit = unit_scores(scores, slots, context)
            top = per_unit.topk(min(self.seed_units, per_unit.shape[-1]), dim=-1)
            chosen = top.indices.masked_fill(~torch.isfinite(top.values), -2)  # -2: no unit
            seeds = (slots.unsqueeze(-1) == chosen.unsqueeze(1)).any(-1) & context
            query = query | seeds
            scores = lexical_scores(input_ids, attn, query, self.doc_tokens, self.vocab_size)
        return scores


def lexical_scores(
    input_ids: torch.Tensor,
    attn: torch.Tensor,
    query: torch.Tensor,
    doc_tokens: int = 32,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``[B, n]`` BM25-style overlap of each context token with the ``query`` tokens of its row
    (see :class:`LexicalOverlapMask`), plus ``1e-3 * position / length`` to break ties by recency; the
    query tokens themselves first (``1e4``: an observation window is kept, as SnapKV keeps it);
    ``-inf`` on padding."""
    b, n = input_ids.shape
    size = max(int(vocab_size or 0), int(input_ids.max()) + 1 if input_ids.numel() else 1)
    ids = input_ids.clamp(min=0)
    context = attn & ~query
    counts = torch.zeros(b, size, device=ids.device).scatter_add_(1, ids, context.float())
    # scatter_add, never scatter_: an id in the query and in the context is written by both, and a
    # plain scatter keeps one write in an order CUDA leaves open (seen on an H200: the context's
    # False won for 30% of the answers asked about)
    asked = torch.zeros(b, size, device=ids.device).scatter_add_(1, ids, query.float()) > 0
    docs = (context.sum(-1, keepdim=True).float() / doc_tokens).clamp(min=1)
    freq = torch.minimum(counts.gather(1, ids), docs)  # a document frequency cannot pass the documents
    idf = torch.log1p(((docs - freq + 0.5) / (freq + 0.5)).clamp(min=0))
    score = idf * asked.gather(1, ids).float() * context.float()
    pos = torch.arange(n, device=ids.device, dtype=torch.float32) / attn.sum(-1, keepdim=True).clamp(min=1)
    return (score + 1e-3 * pos + 1e4 * query.float()).masked_fill(~attn, float("-inf"))
