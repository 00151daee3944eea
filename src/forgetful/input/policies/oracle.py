"""The oracle: a reference that reads the target, to bound what any selector can gain (headroom).

It keeps units (``oracle@sentence``, ``oracle@task``, ``oracle@chunk:32``; token-level search would
take ``n x n`` forwards) at the exact token budget, choosing them by the **frozen LM's target NLL**:

1. start from a baseline's ranking of the units (``start``, default ``recency``: its token scores
   averaged over each unit); the baseline's own keep set (which may keep tokens, not units) is kept
   where the search ends worse, so the oracle is never worse than that baseline;
2. local search on the ranking, which decides the keep set (units taken in rank order, the last one
   in part, :func:`~forgetful.input.units.fill_by_unit_order`): each round scores every kept unit's
   removal (the next unit fills its tokens); the weakest kept unit is dropped if that alone lowers
   the NLL, else every unit outside the keep set is tried in its place; the best move that lowers
   the NLL is taken; ``rounds`` rounds at most, a row stops when no move helps;
3. a row whose keep sets number at most ``exhaustive`` (64) is searched exhaustively instead:
   every keep set a ranking can give (a set of whole units and one unit in part), so its result is
   the optimum (``exhaustive=0``: never).

Each round costs about one forward per unit of the row. It is printed apart and never a baseline:
it reads what no policy can read. ``last_stats`` holds how each batch went (start and final NLL,
rounds, moves, rows searched exhaustively).
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch
from torch import nn

from ...errors import ForgetfulError
from ..compression import budget_counts, compress_examples, compressed_nll, eligible_tokens, free_budget
from ..units import fill_by_unit_order, unit_scores, unit_sizes
from .base import ForgetMask, build_mask, register_mask

_READS_TARGET = (
    "the oracle reads the target: it chooses keep sets with choose(batch, ...) (evaluate_strategy does), not from "
    "logits; it is a reference to score, not a policy to train or sample"
)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every slot (0 = first) by descending score, ties by slot; ``-inf`` last."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )


def keep_sets_by_units(
    units: torch.Tensor, eligible: torch.Tensor, forced: torch.Tensor, k_free: int, limit: int | None = None
) -> torch.Tensor | None:
    """Every keep mask (``[C, n]`` bool) that filling whole units in some order can give one row
    (``units``, ``eligible``, ``forced``: ``[n]``): a set of whole units and, where they fall short,
    the first tokens of one more unit, ``k_free`` eligible tokens in all. None when the row has
    eligible tokens outside every unit (filling would mix them in), or when there are more than
    ``limit`` of them (the enumeration stops there)."""
    inside = eligible & (units >= 0)
    if bool((eligible & ~inside).any()):
        return None
    ids = torch.unique(units[inside])
    member = units.unsqueeze(0) == ids.unsqueeze(1)  # [U, n]
    member &= eligible.unsqueeze(0)
    sizes = member.sum(1).tolist()
    if k_free >= sum(sizes):
        return (eligible | forced).unsqueeze(0)
    # whole-unit sets have at most as many units as the smallest ones that fit in the budget; with a
    # limit, refuse at once when there are more such sets to visit than 64 x the limit (a passage of
    # 40 sentences of which 10 fit has 10**9 of them, few of them within the limit's reach)
    fit = sum(1 for total in itertools.accumulate(sorted(sizes)) if total <= k_free)
    if limit is not None and sum(math.comb(len(sizes), c) for c in range(fit + 1)) > 64 * max(limit, 1):
        return None
    found: list[tuple[tuple[int, ...], int | None]] = []  # (whole units, the unit kept in part)
    for count in range(fit + 1):
        for whole in itertools.combinations(range(len(ids)), count):
            size = sum(sizes[i] for i in whole)
            if size == k_free:
                found.append((whole, None))
            elif size < k_free:
                found += [
                    (whole, part) for part in range(len(ids)) if part not in whole and size + sizes[part] > k_free
                ]
            if limit is not None and len(found) > limit:
                return None
    masks = []
    for whole, part in found:
        taken = member[list(whole)].any(0) if whole else torch.zeros_like(eligible)
        if part is not None:
            size = sum(sizes[i] for i in whole)
            taken = taken | (member[part] & (member[part].long().cumsum(0) <= k_free - size))
        masks.append(taken)
    if not masks:
        return None
    return torch.unique(torch.stack(masks), dim=0) | forced


@register_mask("oracle")
class OracleMask(ForgetMask):
    """Keeps the units that lower the frozen LM's target NLL most (see the module docstring):
    a reference that reads the target, never a baseline. Options: ``start`` (the baseline it
    starts from, in the strategy grammar), ``rounds``, ``exhaustive``, ``rows_per_forward``."""

    name = "oracle"
    reads_target = True

    def __init__(
        self,
        scorer_model: nn.Module,
        start: str = "recency",
        rounds: int = 4,
        exhaustive: int = 64,
        rows_per_forward: int = 16,
    ):
        super().__init__()
        if rounds < 0 or exhaustive < 0 or rows_per_forward < 1:
            raise ForgetfulError(
                f"oracle: rounds and exhaustive must be >= 0 and rows_per_forward >= 1, got {rounds}, "
                f"{exhaustive}, {rows_per_forward}"
            )
        object.__setattr__(self, "_scorer", scorer_model)  # not a submodule: never trained or saved
        self.start = start
        if str(start).partition("@")[0].partition(":")[0].strip() == "oracle":
            raise ForgetfulError("the oracle starts from a baseline, not from another oracle")
        self._start = build_mask(start, scorer_model, learned=False)
        self.rounds, self.exhaustive, self.rows_per_forward = rounds, exhaustive, rows_per_forward
        self.last_stats: dict = {}
        self.lm_tokens = 0  # tokens the search made the LM read, in all

    @classmethod
    def create(cls, model=None, *, seed=0, device="cpu", **options):
        if model is None:
            raise ForgetfulError("the oracle needs the causal LM whose target NLL it minimises")
        return cls(model, **options)

    def keep_logits(self, input_ids, attention_mask=None, *, protect=None, units=None):
        raise ForgetfulError(_READS_TARGET)

    def greedy(self, *args, **kwargs):
        raise ForgetfulError(_READS_TARGET)

    def sample(self, *args, **kwargs):
        raise ForgetfulError(_READS_TARGET)

    def scorer_layers(self) -> int:
        return 0  # a reference: its search is not a cost of the strategy it bounds

    # -- scoring ------------------------------------------------------------------------------
    def _nll(self, batch, rows: torch.Tensor, keep: torch.Tensor, pad: int, autocast) -> torch.Tensor:
        """Mean target NLL ``[C]`` of ``batch``'s ``rows`` compressed to ``keep`` ``[C, n]``."""
        out = []
        for lo in range(0, len(rows), self.rows_per_forward):
            r, k = rows[lo : lo + self.rows_per_forward], keep[lo : lo + self.rows_per_forward]
            inputs = compress_examples(
                batch.context_ids[r],
                batch.context_mask[r],
                k,
                batch.target_ids[r],
                batch.target_mask[r],
                pad,
                forget_layer=self.forget_layer,
            )
            self.lm_tokens += int(inputs["input_ids"].numel())
            with autocast():
                out.append(compressed_nll(self._scorer, inputs).mean_per_row().float())
        return torch.cat(out) if out else torch.zeros(0, device=keep.device)

    @torch.no_grad()
    def choose(
        self, batch, *, keep_ratio: float, keep_first: bool = True, pad_token_id: int = 0, autocast=None
    ) -> torch.Tensor:
        """The oracle's keep mask ``[B, n]`` for ``batch`` (a :class:`~forgetful.input.examples.ForgetBatch`)
        at ``keep_ratio``: exact budget, token 0 and protected tokens kept."""
        if self.unit == "token":
            raise ForgetfulError(
                "the oracle searches over units (token-level search takes n x n forwards): use oracle@sentence, "
                "oracle@task or oracle@chunk:N"
            )
        autocast = autocast or contextlib.nullcontext
        was_training = self._scorer.training
        self._scorer.eval()
        attn = batch.context_mask.bool()
        eligible, forced = eligible_tokens(attn, keep_first, batch.protect_mask)
        k = budget_counts(attn, keep_ratio=keep_ratio, keep_first=keep_first, protect=batch.protect_mask)
        k_free = free_budget(k, eligible, forced)
        units = self.resolve_units(batch.units(self.unit), attn)
        with autocast():
            start_logits = self._start.keep_logits(
                batch.context_ids, attn, protect=batch.protect_mask, units=units
            ).float()
        rank = _rank(unit_scores(start_logits, units, eligible))
        present = unit_sizes(units, eligible) > 0
        rows = torch.arange(len(batch), device=attn.device)
        keep, touched = fill_by_unit_order(rank, units, eligible, forced, k_free)
        nll = self._nll(batch, rows, keep, pad_token_id, autocast)
        start_nll = nll.clone()
        small = [False] * len(batch)
        for b in range(len(batch) if self.exhaustive else 0):  # rows with few keep sets: all of them
            sets = keep_sets_by_units(units[b], eligible[b], forced[b], int(k_free[b]), limit=self.exhaustive)
            if sets is None:
                continue
            small[b] = True
            scores = self._nll(batch, torch.full((len(sets),), b, device=attn.device), sets, pad_token_id, autocast)
            best = int(scores.argmin())
            if float(scores[best]) < float(nll[b]):
                keep[b], nll[b] = sets[best], scores[best]
        active = ~torch.tensor(small, dtype=torch.bool, device=attn.device)
        moves = torch.zeros(len(batch), dtype=torch.long, device=attn.device)
        rounds_run = 0
        for _ in range(self.rounds):
            if not bool(active.any()):
                break
            rounds_run += 1
            rank, keep, nll, moved = self._round(
                batch,
                rank,
                touched,
                present,
                active,
                keep,
                nll,
                units,
                pad_token_id,
                autocast,
                eligible,
                forced,
                k_free,
            )
            _, touched = fill_by_unit_order(rank, units, eligible, forced, k_free)
            moves += moved.long()
            active &= moved
        # the start's own keep set (it may keep tokens, not units): the oracle is never worse than it
        with autocast():
            own = self._start.greedy(
                batch.context_ids,
                attn,
                keep_ratio=keep_ratio,
                keep_first=keep_first,
                protect=batch.protect_mask,
                units=batch.units(self._start.unit),
            )
        own_nll = self._nll(batch, rows, own, pad_token_id, autocast)
        better = own_nll < nll
        keep, nll = torch.where(better.unsqueeze(-1), own, keep), torch.where(better, own_nll, nll)
        was_training and self._scorer.train()
        self.last_stats = {
            "start_nll": own_nll.tolist(),
            "unit_start_nll": start_nll.tolist(),
            "rows_start_kept": int(better.sum()),
            "oracle_nll": nll.tolist(),
            "rounds": rounds_run,
            "moves": moves.tolist(),
            "exhaustive_rows": int(sum(small)),
        }
        return keep

    def _round(self, batch, rank, touched, present, active, keep, nll, units, pad, autocast, eligible, forced, k_free):
        """One round of the local search on the ``active`` rows; returns the new ranks, keep masks,
        NLLs and which rows moved."""
        n = rank.shape[-1]
        parts = dict(units=units, eligible=eligible, forced=forced, k_free=k_free)
        # removal of each kept unit: it goes last, the next units fill its tokens
        rows, slots = (present & (rank < touched.unsqueeze(-1)) & active.unsqueeze(-1)).nonzero(as_tuple=True)
        if len(rows) == 0:
            return rank, keep, nll, torch.zeros_like(active)
        key = rank[rows].float()
        key[torch.arange(len(rows)), slots] = float(n)
        removed = self._candidates(batch, rows, key, parts, pad, autocast)
        best, at = _best_per_row(rows, removed[2], len(nll))
        improve = active & (best < nll)
        new = [rank.clone(), keep.clone(), nll.clone()]
        _take(new, removed, improve, at)
        # otherwise: every unit outside the keep set tried in the weakest kept unit's place
        swapping = active & ~improve & torch.isfinite(best)
        weakest = slots[at.clamp(min=0)]
        rows2, slots2 = (present & (rank >= touched.unsqueeze(-1)) & swapping.unsqueeze(-1)).nonzero(as_tuple=True)
        moved = improve.clone()
        if len(rows2):
            key = rank[rows2].float()
            ar, w = torch.arange(len(rows2), device=rows2.device), weakest[rows2]
            key[ar, slots2] = key[ar, w] - 0.5  # the outside unit takes the weakest one's place
            key[ar, w] = float(n)  # and the weakest goes last
            swapped = self._candidates(batch, rows2, key, parts, pad, autocast)
            best2, at2 = _best_per_row(rows2, swapped[2], len(nll))
            better = swapping & (best2 < nll)
            _take(new, swapped, better, at2)
            moved |= better
        return (*new, moved)

    def _candidates(self, batch, rows, key, parts, pad, autocast):
        """(ranks, keep masks, NLLs) of candidate orderings ``key`` (``[C, n]``, lower first) of ``rows``."""
        cand_rank = _rank(-key)
        cand_keep, _ = fill_by_unit_order(
            cand_rank, parts["units"][rows], parts["eligible"][rows], parts["forced"][rows], parts["k_free"][rows]
        )
        return cand_rank, cand_keep, self._nll(batch, rows, cand_keep, pad, autocast)


def _best_per_row(rows: torch.Tensor, values: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (of ``count``): the lowest of its candidates' ``values`` (inf: none) and that
    candidate's index (the first on ties; -1: none)."""
    best = torch.full((count,), float("inf"), device=values.device).scatter_reduce(0, rows, values, "amin")
    index = torch.arange(len(rows), device=rows.device)
    hit = torch.where(values == best[rows], index, torch.full_like(index, len(rows)))
    first = torch.full((count,), len(rows), device=rows.device, dtype=torch.long).scatter_reduce(0, rows, hit, "amin")
    return best, torch.where(first < len(rows), first, torch.full_like(first, -1))


def _take(state: list[torch.Tensor], candidates: tuple, rows: torch.Tensor, at: torch.Tensor) -> None:
    """Replace (rank, keep, nll) of the ``rows`` (bool ``[B]``) with their candidate ``at``."""
    picked = at[rows]
    for current, found in zip(state, candidates):
        current[rows] = found[picked]
