"""Units of selection: a policy may keep whole units instead of single tokens.

A *unit* groups context tokens that are kept or forgotten together: ``token`` (every token on its
own), ``sentence`` (split from the text by the tokenizer's own strings, no task knowledge),
``chunk:N`` (fixed runs of ``N`` tokens) or ``task`` (units the task declares, e.g. one per answer
in a TOFU-QA passage). A batch carries its units as ``[B, n]`` long ids (-1: a token in no unit).

The budget stays exact in tokens. Units are ranked by score (the mean keep-logit of their eligible
tokens) and kept in that order until the budget is filled; **the last unit is kept in part** (its
first tokens in reading order) when the whole of it does not fit. So every row keeps exactly ``b``
tokens and unit boundaries are broken at most once per row.

Sampling is Gumbel-top-k over units, which draws an ordering of units from the Plackett-Luce
distribution over softmax(unit scores). The keep set depends only on the first ``m`` units of that
ordering (``m``: the units touched, the last one maybe in part), so its log-probability is the
Plackett-Luce log-probability of that ordered prefix, exact.

Everything here is vectorised over rows and tokens. Unit tensors are sized ``n`` (there are never
more units than tokens), so nothing is read back from the device.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import torch

from ..errors import ForgetfulError
from .compression import KeepSample, free_budget, gumbel_order, plackett_luce_log_prob, softmax_entropy

UNIT_KINDS = ("token", "sentence", "chunk:N", "task")
_CHUNK = re.compile(r"^chunk:(\d+)$")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$|\n")


def check_unit(spec: str) -> str:
    """``spec`` if it names a unit kind, else one clear error."""
    if spec in ("token", "sentence", "task"):
        return spec
    m = _CHUNK.match(str(spec))
    if m and int(m.group(1)) >= 1:
        return spec
    raise ForgetfulError(f"unknown unit '{spec}'; choose token, sentence, task or chunk:N (N >= 1 tokens)")


def sentence_end_table(tokenizer) -> np.ndarray:
    """Bool per vocabulary id: the token's text ends a sentence (``.``, ``!`` or ``?``, maybe
    followed by quotes or brackets) or holds a line break. Built once per tokenizer (cached on it)."""
    cached = getattr(tokenizer, "_forgetful_sentence_ends", None)
    if cached is not None:
        return cached
    size = max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    table = np.fromiter((bool(_SENTENCE_END.search(t)) for t in texts), dtype=bool, count=size)
    with contextlib.suppress(AttributeError):  # a tokenizer that refuses attributes: computed again next time
        tokenizer._forgetful_sentence_ends = table
    return table


def sentence_ids(ids: list[int] | np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sentence index of every token of one sequence: a new sentence starts after a token that ends
    one (ids outside the table end nothing)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(ends))
    ending = np.zeros(ids.shape, dtype=bool)
    ending[inside] = ends[ids[inside]]
    starts = np.concatenate([[0], ending[:-1].astype(np.int64)])
    return np.cumsum(starts)


def add_sentence_ids(dataset, tokenizer, column: str = "context_ids"):
    """``dataset`` with a ``sentence_ids`` column (one sentence index per token of ``column``)."""
    ends = sentence_end_table(tokenizer)

    def add(batch):
        return {"sentence_ids": [sentence_ids(ids, ends).tolist() for ids in batch[column]]}

    return dataset.map(add, batched=True, desc="sentences")


def unit_ids(
    spec: str,
    context_mask: torch.Tensor,
    *,
    sentence_ids: torch.Tensor | None = None,
    task_units: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``[B, n]`` unit id of every context token for the unit kind ``spec`` (-1: in no unit), or
    None for ``token`` (every token its own unit)."""
    check_unit(spec)
    if spec == "token":
        return None
    m = _CHUNK.match(spec)
    if m:
        size = int(m.group(1))
        pos = torch.arange(context_mask.shape[1], device=context_mask.device)
        return (pos // size).expand(context_mask.shape).masked_fill(~context_mask.bool(), -1)
    found = sentence_ids if spec == "sentence" else task_units
    if found is None:
        what = (
            "sentence ids (examples made by load_forget_examples or tofu_qa_examples)"
            if spec == "sentence"
            else ("units declared by its task (TOFU-QA passages declare one per answer)")
        )
        raise ForgetfulError(f"a policy that keeps {spec} units needs {what}; these examples have none")
    if found.shape != context_mask.shape:
        raise ForgetfulError(
            f"{spec} unit ids have shape {tuple(found.shape)}, the context {tuple(context_mask.shape)}"
        )
    return found.long().masked_fill(~context_mask.bool(), -1)


def _scatter_slots(units: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Unit id of each eligible token as a scatter index (-1 and ineligible go to slot 0 with
    weight 0; callers mask them)."""
    return torch.where(eligible & (units >= 0), units, torch.zeros_like(units))


def unit_scores(token_scores: torch.Tensor, units: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """``[..., B, n]`` score per unit slot: the mean of its eligible tokens' scores; ``-inf`` for a
    slot with no eligible token (differentiable in the token scores)."""
    inside = eligible & (units >= 0)
    slots = _scatter_slots(units, eligible).expand(token_scores.shape)
    weight = inside.to(token_scores.dtype).expand(token_scores.shape)
    values = torch.where(inside, token_scores, torch.zeros_like(token_scores))
    sums = torch.zeros_like(token_scores).scatter_add(-1, slots, values)
    counts = torch.zeros_like(token_scores).scatter_add(-1, slots, weight)
    mean = sums / counts.clamp(min=1)
    return mean.masked_fill(counts == 0, float("-inf"))


def unit_sizes(units: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` eligible tokens per unit slot."""
    inside = (eligible & (units >= 0)).long()
    return torch.zeros_like(units).scatter_add(-1, _scatter_slots(units, eligible), inside)


def fill_by_unit_order(
    rank: torch.Tensor, units: torch.Tensor, eligible: torch.Tensor, forced: torch.Tensor, k_free: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep tokens unit by unit in ``rank`` order (``[..., B, n]``, 0 = first), each unit's tokens
    in reading order, until ``k_free`` eligible tokens are kept; eligible tokens in no unit come after
    every unit. Returns (keep ``[..., B, n]``, units touched ``[..., B]``)."""
    n = units.shape[-1]
    pos = torch.arange(n, device=units.device)
    in_unit = units >= 0
    token_rank = rank.gather(-1, units.clamp(min=0).expand(rank.shape)).masked_fill(~in_unit, n)
    key = token_rank * (n + 1) + pos
    key = key.masked_fill(~eligible, (n + 2) * (n + 1))
    order = key.argsort(dim=-1, stable=True)
    taken = torch.arange(n, device=units.device) < k_free.unsqueeze(-1)
    keep = torch.zeros(key.shape, dtype=torch.bool, device=units.device).scatter(-1, order, taken.expand(key.shape))
    ordered = key.gather(-1, order)  # the keys in taking order: the k_free-th is the last token taken
    last = ordered.gather(-1, (k_free - 1).clamp(min=0).unsqueeze(-1).expand(*key.shape[:-1], 1)).squeeze(-1)
    touched = torch.where(k_free > 0, (last // (n + 1)).clamp(max=n - 1) + 1, torch.zeros_like(last))
    return keep | forced, touched


def unit_topk_keep(
    token_scores: torch.Tensor, units: torch.Tensor, k: torch.Tensor, eligible: torch.Tensor, forced: torch.Tensor
) -> torch.Tensor:
    """The exact-budget keep mask that takes whole units by descending score (the last in part);
    ``k`` counts forced tokens too, as in :func:`~forgetful.input.compression.topk_keep`."""
    scores = unit_scores(token_scores.float(), units, eligible)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    keep, _ = fill_by_unit_order(rank, units, eligible, forced, free_budget(k, eligible, forced))
    return keep


def unit_gumbel_keep(
    token_logits: torch.Tensor,
    units: torch.Tensor,
    k: torch.Tensor,
    eligible: torch.Tensor,
    forced: torch.Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> KeepSample:
    """Sample ``num_samples`` exact-budget keep sets per row by Gumbel-top-k over units
    (Plackett-Luce over softmax(unit scores)); the log-probability is that of the ordered prefix of
    units the keep set touched, the entropy that of the softmax over units. ``noise``: uniform
    ``[S, B, n]``, one value per unit slot."""
    logits = unit_scores(token_logits.float(), units, eligible)
    drawable = torch.isfinite(logits)
    order, finite = gumbel_order(logits, drawable, num_samples, generator, noise)
    positions = torch.arange(order.shape[-1], device=order.device).expand(order.shape)
    rank = torch.empty_like(order).scatter(-1, order, positions)
    k_free = free_budget(k, eligible, forced)
    keep, touched = fill_by_unit_order(rank, units, eligible, forced, k_free)
    # tokens in no unit fill what the units could not: they are no draw of the ordering
    touched = torch.minimum(touched, drawable.sum(-1))
    log_prob = plackett_luce_log_prob(finite.expand(order.shape), order, touched)
    return KeepSample(keep, log_prob, softmax_entropy(finite, drawable))


def whole_units_kept(keep: torch.Tensor, marked: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: every token of the ``marked`` span (e.g. the answer to the question asked) was
    kept; rows with no marked token count as kept."""
    marked = marked.bool() & context_mask.bool()
    return ~(marked & ~keep.bool()).any(-1)
