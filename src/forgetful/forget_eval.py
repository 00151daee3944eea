"""Scoring a forgetting strategy: target NLL of compressed inputs at a keep ratio.

Shared by training (periodic evaluation) and ``forgetful eval-forget``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .compression import compress_examples
from .data import ForgetBatch, ForgetCollator
from .masks import (
    ForgetMask,
    IdentityMask,
    NoContextMask,
    RandomForgetMask,
    RecencyMask,
    SelfInformationMask,
)
from .token_loss import token_nll

BASELINES = ("identity", "none", "random", "recency", "self_information")


def baseline_masks(model: nn.Module, seed: int = 0, names: Sequence[str] = BASELINES,
                   device: torch.device | str = "cpu") -> dict[str, ForgetMask]:
    """The strategies that are not learned, by name."""
    out: dict[str, ForgetMask] = {}
    for name in names:
        if name == "identity":
            out[name] = IdentityMask()
        elif name == "none":
            out[name] = NoContextMask()
        elif name == "random":
            out[name] = RandomForgetMask(0.5, generator=torch.Generator(device=device).manual_seed(seed))
        elif name == "recency":
            out[name] = RecencyMask()
        elif name == "self_information":
            out[name] = SelfInformationMask(model)
        else:
            raise ValueError(f"unknown baseline {name}")
    return out


def batches_of(dataset, batch_size: int, pad_token_id: int, max_batches: int | None = None) -> list[ForgetBatch]:
    """Collated evaluation batches, in dataset order."""
    collate = ForgetCollator(pad_token_id)
    n = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)
    return [collate(dataset.select(range(i, min(i + batch_size, n))).to_list()) for i in range(0, n, batch_size)]


@torch.no_grad()
def evaluate_strategy(
    model: nn.Module,
    mask: ForgetMask,
    batches: Iterable[ForgetBatch],
    *,
    keep_ratio: float,
    pad_token_id: int,
    keep_first: bool = True,
    device: torch.device | str | None = None,
    autocast=None,
) -> dict:
    """Target NLL (token-weighted mean), perplexity, kept tokens, and - where the data marks fact
    tokens - the share of fact tokens the strategy kept."""
    import contextlib

    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    nll_sum, n_tok, kept, ctx, facts_kept, facts = 0.0, 0, 0, 0, 0, 0
    for batch in batches:
        b = batch.to(device)
        with autocast():
            keep = mask.greedy(b.context_ids, b.context_mask, forget_p=1.0 - keep_ratio if keep_ratio < 1 else 0.0,
                               keep_first=keep_first)
            inputs = compress_examples(b.context_ids, b.context_mask, keep, b.target_ids, b.target_mask, pad_token_id)
            out = token_nll(model, inputs["input_ids"], inputs["labels"], attention_mask=inputs["attention_mask"],
                            position_ids=inputs["position_ids"], target_length=inputs["target_length"])
        nll_sum += float(out.nll.sum())
        n_tok += out.nll.numel()
        kept += int((keep & b.context_mask).sum())
        ctx += int(b.context_mask.sum())
        if b.fact_mask is not None:
            facts_kept += int((keep & b.fact_mask).sum())
            facts += int(b.fact_mask.sum())
    model.train(was_training)
    n_rows = sum(len(b) for b in batches) if isinstance(batches, list) else None
    nll = nll_sum / max(n_tok, 1)
    return {
        "nll": nll,
        "ppl": math.exp(nll) if nll < 50 else float("inf"),
        "kept_tokens": kept / n_rows if n_rows else float(kept),
        "context_tokens": ctx / n_rows if n_rows else float(ctx),
        "target_tokens": n_tok,
        "fact_recall": facts_kept / facts if facts else None,
    }
