"""Loss masks at a chosen share of the forget answers' tokens, so that masks can be compared at
matched shares (the TOFU experiment's ``--mask-shares``). Each builder takes every forget answer at
once (the share is of all their tokens together) and returns one mask per answer (1 = trained,
0 = masked out of the loss), with exactly ``round(share * tokens)`` zeros where it says so:

* :func:`surprise_masks` - the tokens the model *before finetuning* finds least predictable (the
  highest NLL, :func:`answer_token_nll`), plus every recurrence of the entity words among them in
  the forget answers; exact;
* :func:`fact_subset_masks` - a random subset of the fact spans' tokens (:func:`~.masks.fact_spans`),
  whole spans in a seeded random order; exact up to the tokens the spans hold;
* :func:`random_share_masks` - a seeded random subset of the tokens; exact;
* :func:`goldfish_k` - goldfish's ``k`` for a share (drop 1 in ``round(1 / share)``; about the share).

A *word* is a maximal run of letters, digits and underscores (``\\w+``); an *entity word* is one
with a digit, or a capitalised one whose lower-case form never occurs among the forget answers'
words (a name or a title, not a sentence-initial "The"). A surprise mask selects tokens in order of
decreasing NLL; a selected token inside an entity word masks that word everywhere it recurs in the
forget answers (a name the model learns in one answer is learnt from every answer that repeats it).
Selection stops at the largest prefix whose masked tokens, recurrences included, fit the share, and
the next most surprising tokens fill what is left, alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ForgetfulError, check_probability
from ..nll import token_nll
from .masks import fact_spans
from .trainer import SelectiveLossCollator

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class ForgetAnswer:
    """One forget row's scored tokens: their character ``offsets`` relative to ``text`` (the answer;
    EOS has an empty span at its end) and, for :func:`surprise_masks`, their ``nll`` under the model
    before finetuning."""

    text: str
    offsets: Sequence[tuple[int, int]]
    nll: Sequence[float] | None = None


def masked_count(total: int, share: float) -> int:
    """How many of ``total`` tokens a mask at ``share`` masks: ``round(share * total)``."""
    check_probability("mask share", share, allow_one=True)
    return int(round(share * total))


def goldfish_k(share: float) -> int:
    """Goldfish's ``k`` (drop 1 token in k) nearest to ``share``: ``round(1 / share)``, at least 2."""
    check_probability("mask share", share, allow_one=True)
    if share <= 0:
        raise ForgetfulError("goldfish at a mask share needs a share above 0")
    return max(2, int(round(1 / share)))


def _split(flat: np.ndarray, answers: Sequence[ForgetAnswer]) -> list[np.ndarray]:
    cuts = np.cumsum([len(a.offsets) for a in answers])[:-1]
    return [m.astype(np.int8) for m in np.split(flat, cuts)]


def _token_words(answers: Sequence[ForgetAnswer]) -> tuple[np.ndarray, np.ndarray]:
    """Per token of the concatenated answers, the id of the word it lies in (-1: none) and, per word
    id, whether it is an entity word."""
    vocab: dict[str, int] = {}
    per_answer = []
    for a in answers:
        spans = [(m.start(), m.end(), vocab.setdefault(m.group(), len(vocab))) for m in _WORD.finditer(a.text)]
        off = np.asarray(a.offsets, dtype=np.int64).reshape(-1, 2)
        ids = np.full(len(off), -1, dtype=np.int64)
        if spans:
            w = np.asarray(spans, dtype=np.int64)
            j = np.searchsorted(w[:, 1], off[:, 0], side="right")  # the first word ending after the token starts
            inside = j < len(w)
            j = np.minimum(j, len(w) - 1)
            hit = inside & (w[j, 0] < off[:, 1]) & (off[:, 1] > off[:, 0])
            ids[hit] = w[j[hit], 2]
        per_answer.append(ids)
    words = list(vocab)
    lower = {w for w in words if w == w.lower()}
    entity = np.array(
        [any(c.isdigit() for c in w) or (w != w.lower() and w.lower() not in lower) for w in words], dtype=bool
    )
    return (np.concatenate(per_answer) if per_answer else np.zeros(0, dtype=np.int64)), entity


def surprise_masks(answers: Sequence[ForgetAnswer], share: float) -> list[np.ndarray]:
    """Mask exactly ``round(share * tokens)`` tokens of the forget answers: the most surprising ones
    (highest ``nll``; ties in reading order) with the recurrences of their entity words (see the
    module docstring)."""
    if any(a.nll is None or len(a.nll) != len(a.offsets) for a in answers):
        raise ForgetfulError(
            "surprise masks need one NLL per scored token of every forget answer; the scores were written for "
            "another tokenizer or prompt template: write them again"
        )
    nll = np.concatenate([np.asarray(a.nll, dtype=np.float64) for a in answers])
    target = masked_count(len(nll), share)
    word, entity = _token_words(answers)
    order = np.argsort(-nll, kind="stable")
    word_of = np.where(word >= 0, word, 0)
    is_entity = (word >= 0) & entity[word_of] if len(entity) else np.zeros(len(word), dtype=bool)

    def masked(k: int) -> np.ndarray:
        chosen = order[:k]
        out = np.zeros(len(nll), dtype=bool)
        out[chosen] = True
        out |= is_entity & np.isin(word, word[chosen][is_entity[chosen]])
        return out

    lo, hi = 0, target  # the largest k whose mask, recurrences included, fits: masked(k).sum() >= k grows with k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if masked(mid).sum() <= target:
            lo = mid
        else:
            hi = mid - 1
    out = masked(lo)
    rest = order[lo:][~out[order[lo:]]]
    out[rest[: target - int(out.sum())]] = True
    return _split(~out, answers)


def fact_subset_masks(answers: Sequence[ForgetAnswer], share: float, seed: int, spacy_model=None) -> list[np.ndarray]:
    """Mask ``round(share * tokens)`` tokens of the forget answers' fact spans
    (:func:`~.masks.fact_spans`): the spans in a random order (seeded), whole, the last one cut to
    fit. When the spans hold fewer tokens, all of them (the mask's share is then below ``share``)."""
    span_of = []
    offset = 0
    for a in answers:
        spans = np.asarray(fact_spans(a.text, spacy_model), dtype=np.int64).reshape(-1, 2)
        off = np.asarray(a.offsets, dtype=np.int64).reshape(-1, 2)
        ids = np.full(len(off), -1, dtype=np.int64)
        if len(spans):
            over = (off[:, None, 0] < spans[None, :, 1]) & (spans[None, :, 0] < off[:, None, 1])
            over &= (off[:, 1] > off[:, 0])[:, None]
            hit = over.any(axis=1)
            ids[hit] = offset + over[hit].argmax(axis=1)  # a token across two spans counts for the first
        span_of.append(ids)
        offset += len(spans)
    span = np.concatenate(span_of) if span_of else np.zeros(0, dtype=np.int64)
    target = masked_count(len(span), share)
    rank = np.random.default_rng(seed).permutation(max(offset, 1))
    facts = np.flatnonzero(span >= 0)
    chosen = facts[np.argsort(rank[span[facts]], kind="stable")][:target]
    out = np.ones(len(span), dtype=bool)
    out[chosen] = False
    return _split(out, answers)


def random_share_masks(answers: Sequence[ForgetAnswer], share: float, seed: int) -> list[np.ndarray]:
    """Mask exactly ``round(share * tokens)`` tokens of the forget answers, drawn at random (seeded)."""
    total = sum(len(a.offsets) for a in answers)
    out = np.ones(total, dtype=bool)
    out[np.random.default_rng(seed).permutation(total)[: masked_count(total, share)]] = False
    return _split(out, answers)


@torch.no_grad()
def answer_token_nll(model, rows, pad_id: int, batch_size: int = 16, progress: bool = False) -> list[np.ndarray]:
    """Per row of ``rows`` (``input_ids``, ``attention_mask``, ``loss_mask``), the NLL of each trained
    token in reading order, under ``model`` as it is (eval mode, its device, float32)."""
    from tqdm.auto import tqdm

    collate = SelectiveLossCollator(pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        for i in tqdm(range(0, len(rows), batch_size), desc="surprise scores", disable=not progress):
            part = {
                k: v.to(device) for k, v in collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))]).items()
            }
            res = token_nll(model, part["input_ids"], part["labels"], attention_mask=part["attention_mask"])
            counts = res.count_per_row().cpu().numpy()
            out += np.split(res.nll.float().cpu().numpy(), np.cumsum(counts)[:-1])
    finally:
        model.train(was_training)
    return out
