"""A supervised warm start for unit policies, before REINFORCE refines them.

Labels come from the frozen LM, once per training row: **leave-one-unit-out**, the rise of the
target's mean NLL when one unit is removed from the full context (the ``ΔNLL`` that LLMLingua-2 and
KVzip-style scorers distil). A unit the answer depends on rises a lot; filler, not at all. The policy
is then fitted listwise (ListNet, :func:`~forgetful.input.reinforce_core.listwise_loss`): the
softmax over its unit scores - the first draw of its Plackett-Luce sampler - towards the softmax of
the row's standardised labels. Cost: one forward of the LM per (row, unit), batched.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ForgetfulError
from .compression import compress_examples, compressed_nll, eligible_tokens
from .examples import ForgetBatch
from .policies import ForgetMask
from .policies.residual import standardise
from .reinforce_core import listwise_loss
from .units import unit_scores, unit_sizes


def _row_nll(model: nn.Module, ctx_ids, ctx_mask, keep, tgt_ids, tgt_mask, pad: int) -> torch.Tensor:
    """Mean target NLL per row of the compressed inputs ``c[keep] ++ y``."""
    return compressed_nll(model, compress_examples(ctx_ids, ctx_mask, keep, tgt_ids, tgt_mask, pad)).mean_per_row()


@torch.no_grad()
def leave_one_unit_out(
    model: nn.Module,
    batch: ForgetBatch,
    units: torch.Tensor,
    *,
    pad_token_id: int,
    keep_first: bool = True,
    rows_per_forward: int = 32,
    autocast=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, present)``, both ``[B, n]`` over unit slots: the rise of each row's mean target
    NLL when that unit's tokens leave the full context, and which slots are units of the row."""
    autocast = autocast or contextlib.nullcontext
    eligible, _ = eligible_tokens(batch.context_mask, keep_first, batch.protect_mask)
    present = unit_sizes(units, eligible) > 0
    labels = torch.zeros(present.shape, dtype=torch.float32, device=units.device)
    pairs = present.nonzero()  # (row, unit) of every unit to leave out
    with autocast():
        full = _row_nll(
            model,
            batch.context_ids,
            batch.context_mask,
            batch.context_mask,
            batch.target_ids,
            batch.target_mask,
            pad_token_id,
        )
        for start in range(0, pairs.shape[0], rows_per_forward):
            rows, unit = pairs[start : start + rows_per_forward].unbind(-1)
            keep = batch.context_mask[rows] & ~((units[rows] == unit.unsqueeze(-1)) & eligible[rows])
            nll = _row_nll(
                model,
                batch.context_ids[rows],
                batch.context_mask[rows],
                keep,
                batch.target_ids[rows],
                batch.target_mask[rows],
                pad_token_id,
            )
            labels[rows, unit] = nll - full[rows]
    return labels, present


@dataclass
class WarmStartResult:
    history: list[dict]
    rows: int  # labelled rows
    seconds_labels: float
    seconds_fit: float


def warm_start(
    policy: ForgetMask,
    model: nn.Module,
    batches: list[ForgetBatch],
    *,
    pad_token_id: int,
    steps: int,
    learning_rate: float = 1e-3,
    temperature: float = 0.5,
    keep_first: bool = True,
    device: torch.device | str = "cpu",
    autocast=None,
    progress: bool = True,
) -> WarmStartResult:
    """Label ``batches`` by leaving one unit out (on the frozen ``model``), then fit ``policy``'s
    unit scores to them listwise for ``steps`` steps (cycling over the batches). The labels are
    standardised per row and sharpened by ``temperature``."""
    import time

    from tqdm.auto import tqdm

    if policy.unit == "token":
        raise ForgetfulError(
            "the warm start labels units (sentence, task or chunk:N) by leaving each out; a token policy has too "
            "many to label: give the policy a unit"
        )
    if steps < 1 or not batches:
        raise ForgetfulError(
            f"the warm start needs steps >= 1 and labelled rows, got {steps} steps, {len(batches)} batches"
        )
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    labelled = []
    for b in tqdm(batches, desc="warm-start labels", disable=not progress):
        b = b.to(device)
        units = b.units(policy.unit)
        labels, present = leave_one_unit_out(
            model, b, units, pad_token_id=pad_token_id, keep_first=keep_first, autocast=autocast
        )
        labelled.append((b, units, standardise(labels.masked_fill(~present, float("nan")), present), present))
    t1 = time.perf_counter()
    model.train(was_training)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    history = []
    policy.train()
    for step in tqdm(range(steps), desc="warm-start fit", disable=not progress):
        b, units, target, present = labelled[step % len(labelled)]
        eligible, _ = eligible_tokens(b.context_mask, keep_first, b.protect_mask)
        with autocast():
            logits = policy.keep_logits(b.context_ids, b.context_mask, protect=b.protect_mask, units=units)
        scores = unit_scores(logits.float(), units, eligible)
        loss = listwise_loss(scores, target, present & torch.isfinite(scores), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if math.isfinite(float(loss.detach())):
            history.append({"warm_step": step + 1, "listwise_loss": float(loss.detach())})
    rows = sum(len(b) for b, *_ in labelled)
    return WarmStartResult(history, rows, t1 - t0, time.perf_counter() - t1)
