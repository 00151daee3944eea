"""Scoring forgetting strategies: target NLL of compressed inputs at a keep ratio
(:func:`evaluate_strategy`, shared by training's periodic evaluation), and the full comparison
behind ``forgetful eval-forget`` (:func:`evaluate_forgetting`): for every keep ratio and strategy,
target NLL and perplexity, kept tokens, the FLOP ratio against the full length (the policy's own
cost included) and the attention-only ratio, measured wall time and peak memory of the forward
pass (policy + gather + LM). :func:`write_report` writes ``results.json``, ``report.md`` and two
plots: perplexity vs keep ratio, and measured speedup vs keep ratio beside the FLOP-ideal line.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..measure import peak_memory_mb, time_ms
from ..nll import unwrap_model
from ..rouge import rouge_l_recall
from .compression import compress_examples, compressed_nll
from .examples import ForgetBatch, ForgetCollator
from .flops import body_flops_per_token, decoder_dims, depth_forward_flops, forward_flops
from .policies import ForgetMask, build_mask
from .units import whole_units_kept

# The strategies that are not learned, compared in every report.
BASELINES = ("identity", "none", "random", "recency", "self_information", "attention_score")


def baseline_masks(
    model: nn.Module, seed: int = 0, names: Sequence[str] = BASELINES, device: torch.device | str = "cpu"
) -> dict[str, ForgetMask]:
    """The named strategies that are not learned (the strategy grammar), by their canonical names."""
    masks = [build_mask(name, model, seed=seed, device=device, learned=False) for name in names]
    return {mask.strategy: mask for mask in masks}


def batches_of(dataset, batch_size: int, pad_token_id: int, max_batches: int | None = None) -> list[ForgetBatch]:
    """Collated evaluation batches, in dataset order."""
    collate = ForgetCollator(pad_token_id)
    n = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)
    return [collate(dataset.select(range(i, min(i + batch_size, n))).to_list()) for i in range(0, n, batch_size)]


def choose_keep(
    mask: ForgetMask,
    batch: ForgetBatch,
    *,
    keep_ratio: float,
    keep_first: bool = True,
    pad_token_id: int = 0,
    autocast=None,
) -> torch.Tensor:
    """The strategy's keep mask ``[B, n]`` for ``batch`` at ``keep_ratio``: the greedy top-k of its
    keep-logits, or the oracle's search (a strategy that reads the target)."""
    autocast = autocast or contextlib.nullcontext
    if mask.reads_target:
        return mask.choose(
            batch, keep_ratio=keep_ratio, keep_first=keep_first, pad_token_id=pad_token_id, autocast=autocast
        )
    with autocast():
        return mask.greedy(
            batch.context_ids,
            batch.context_mask,
            keep_ratio=keep_ratio,
            keep_first=keep_first,
            protect=batch.protect_mask,
            units=batch.units(mask.unit),
        )


def score_compressed(
    model: nn.Module,
    mask: ForgetMask,
    batch: ForgetBatch,
    *,
    keep_ratio: float,
    pad_token_id: int,
    keep_first: bool = True,
    autocast=None,
):
    """The strategy's keep mask at ``keep_ratio`` and the NLL of the compressed inputs (forgotten at
    the strategy's ``forget_layer``): ``(keep [B, n], TokenNLL)``. With ``unread_ids`` in the batch
    (the tokens after the target), the LM reads ``c[K] ++ y ++ z`` and every token of ``y`` and
    ``z`` is scored, ``y``'s first: the target's NLL is the same as without ``z`` (causal)."""
    autocast = autocast or contextlib.nullcontext
    keep = choose_keep(
        mask, batch, keep_ratio=keep_ratio, keep_first=keep_first, pad_token_id=pad_token_id, autocast=autocast
    )
    kept = None  # known on the host for rows of one length: the gather then never waits for the device
    if batch.context_length is not None and batch.target_length is not None and batch.protect_mask is None:
        kept = mask.kept_per_row(batch.context_length, keep_ratio=keep_ratio, keep_first=keep_first)
    target_ids, target_mask = batch.target_ids, batch.target_mask
    if batch.unread_ids is not None:
        target_ids = torch.cat([target_ids, batch.unread_ids], 1)
        target_mask = torch.cat([target_mask, torch.ones_like(batch.unread_ids, dtype=torch.bool)], 1)
    inputs = compress_examples(
        batch.context_ids,
        batch.context_mask,
        keep,
        target_ids,
        target_mask,
        pad_token_id,
        kept,
        forget_layer=mask.forget_layer,
    )
    with autocast():
        return keep, compressed_nll(model, inputs)


def _split_unread(out, batch: ForgetBatch):
    """``(target NLL [B, m], unread NLL [B, u] or None)`` of a batch scored with its unread tokens
    (every row has its whole target and unread tokens), or the TokenNLL itself without them."""
    if batch.unread_ids is None:
        return out, None
    per_row = out.nll.view(len(batch), -1)
    m = batch.target_ids.shape[1]
    return per_row[:, :m], per_row[:, m:]


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
    tokenizer=None,
    max_new_tokens: int = 0,
) -> dict:
    """Target NLL (token-weighted mean), perplexity, kept tokens, and - where the data marks fact
    tokens - the share of fact tokens the strategy kept and the share of rows whose marked answer it
    kept whole (``answer_kept``). With ``max_new_tokens``, a ``tokenizer`` and reference answers in
    the batches: the ROUGE-L recall of greedy answers generated from the compressed context. Where
    the batches carry ``unread_ids``: ``nll_unread``, the NLL of those tokens after the target.
    ``per_example`` holds each row's summed target NLL, target tokens and group (the paired
    bootstrap's inputs; ``unread_sum`` / ``unread_tokens`` too). An oracle's search statistics are in
    ``oracle``."""
    from .generation import generate_answers

    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    nll_sum, n_tok, kept, ctx, facts_kept, facts, keeps, rouge = 0.0, 0, 0, 0, 0, 0, [], []
    row_nll, row_tokens, row_group, answer_kept, unread_sum, unread_rows, searches = [], [], [], [], [], [], []
    for batch in batches:
        b = batch.to(device)
        keep, out = score_compressed(
            model, mask, b, keep_ratio=keep_ratio, pad_token_id=pad_token_id, keep_first=keep_first, autocast=autocast
        )
        target, unread = _split_unread(out, b)
        if unread is None:
            nll_sum += float(out.nll.sum())
            n_tok += out.nll.numel()
            row_nll.append(out.sum_per_row().float().cpu())
            row_tokens.append(out.count_per_row().cpu())
        else:
            nll_sum += float(target.sum())
            n_tok += target.numel()
            row_nll.append(target.sum(-1).float().cpu())
            row_tokens.append(torch.full((len(b),), target.shape[1]))
            unread_sum.append(unread.sum(-1).float().cpu())
            unread_rows.append(torch.full((len(b),), unread.shape[1]))
        if mask.reads_target:
            searches.append(mask.last_stats)
        keeps.append(keep)
        row_group.append(b.group.cpu() if b.group is not None else torch.full((len(b),), -1))
        kept += int((keep & b.context_mask).sum())
        ctx += int(b.context_mask.sum())
        if b.fact_mask is not None:
            facts_kept += int((keep & b.fact_mask).sum())
            facts += int(b.fact_mask.sum())
            answer_kept.append(whole_units_kept(keep, b.fact_mask, b.context_mask).cpu())
        if max_new_tokens and tokenizer is not None and b.answers is not None:
            with autocast():
                texts = generate_answers(model, tokenizer, b, keep, max_new_tokens=max_new_tokens)
            rouge += rouge_l_recall(texts, b.answers)
    model.train(was_training)
    n_rows = sum(len(b) for b in batches) if isinstance(batches, list) else None
    nll = nll_sum / max(n_tok, 1)
    per_example = {
        "nll_sum": torch.cat(row_nll).tolist() if row_nll else [],
        "tokens": torch.cat(row_tokens).tolist() if row_tokens else [],
        "group": torch.cat(row_group).tolist() if row_group else [],
    }
    nll_unread = None
    if unread_sum:
        per_example["unread_sum"] = torch.cat(unread_sum).tolist()
        per_example["unread_tokens"] = torch.cat(unread_rows).tolist()
        nll_unread = sum(per_example["unread_sum"]) / max(sum(per_example["unread_tokens"]), 1)
    return {
        "nll": nll,
        "ppl": math.exp(nll) if nll < 50 else float("inf"),
        "nll_unread": nll_unread,
        "kept_tokens": kept / n_rows if n_rows else float(kept),
        "context_tokens": ctx / n_rows if n_rows else float(ctx),
        "target_tokens": n_tok,
        "fact_recall": facts_kept / facts if facts else None,
        "answer_kept": float(torch.cat(answer_kept).float().mean()) if answer_kept else None,
        "rouge": sum(rouge) / len(rouge) if rouge else None,
        "keeps": keeps,  # each batch's keep mask, on the evaluation device
        "oracle": _search_summary(searches) if searches else None,
        "per_example": per_example,
    }


def _search_summary(searches: list[dict]) -> dict:
    start = [x for s in searches for x in s["start_nll"]]
    final = [x for s in searches for x in s["oracle_nll"]]
    return {
        "start_nll": sum(start) / max(len(start), 1),
        "oracle_nll": sum(final) / max(len(final), 1),
        "unit_start_nll": sum(x for s in searches for x in s["unit_start_nll"]) / max(len(final), 1),
        "rows_start_kept": sum(s["rows_start_kept"] for s in searches),
        "rows_moved": sum(int(m > 0) for s in searches for m in s["moves"]),
        "moves": sum(m for s in searches for m in s["moves"]),
        "rounds_max": max(s["rounds"] for s in searches),
        "exhaustive_rows": sum(s["exhaustive_rows"] for s in searches),
        "rows": len(final),
    }


def flops_ratios(
    config,
    batches: list[ForgetBatch],
    keeps: list[torch.Tensor],
    policy_flops_per_token: float,
    *,
    forget_layer: int = 0,
    shared_layers: int = 0,
) -> tuple[float, float]:
    """(total FLOP ratio, attention FLOP ratio) of compressed vs full inputs, summed per example;
    logits are computed at target positions in both. ``forget_layer``: the first layers read the
    whole row (:func:`~.flops.depth_forward_flops`); ``shared_layers``: layers of the policy's own
    scoring that forgetting at depth computes anyway (subtracted from the policy's cost)."""
    d = decoder_dims(config)
    full = comp = att_full = att_comp = 0.0
    early = min(forget_layer, d.layers)
    for batch, keep in zip(batches, keeps):
        n = batch.context_mask.sum(-1).tolist()
        m = batch.target_mask.sum(-1).tolist()
        b = (keep & batch.context_mask).sum(-1).tolist()
        for n_i, m_i, b_i in zip(n, m, b):
            shared = body_flops_per_token(config, n_i, min(shared_layers, early)) if early else 0.0
            full += forward_flops(config, n_i + m_i, m_i)
            comp += depth_forward_flops(config, n_i + m_i, b_i + m_i, early, m_i)
            comp += max(policy_flops_per_token - shared, 0.0) * n_i
            att_full += d.layers * (n_i + m_i) ** 2
            att_comp += early * (n_i + m_i) ** 2 + (d.layers - early) * (b_i + m_i) ** 2
    return comp / full, att_comp / att_full


def _forward_fn(
    model: nn.Module, mask: ForgetMask, batch: ForgetBatch, keep_ratio: float, pad: int, keep_first: bool, autocast
):
    """One timed unit: policy + gather + LM forward on ``batch``."""

    @torch.no_grad()
    def run():
        return score_compressed(
            model, mask, batch, keep_ratio=keep_ratio, pad_token_id=pad, keep_first=keep_first, autocast=autocast
        )[1].nll

    return run


def _policy_fn(mask: ForgetMask, batch: ForgetBatch, keep_ratio: float, keep_first: bool, autocast):
    """One timed unit: the policy's keep mask alone."""

    @torch.no_grad()
    def run():
        return choose_keep(mask, batch, keep_ratio=keep_ratio, keep_first=keep_first, autocast=autocast)

    return run


def evaluate_forgetting(
    model: nn.Module,
    policies: dict[str, ForgetMask],
    dataset,
    *,
    keep_ratios: list[float],
    pad_token_id: int,
    strategies: Sequence[str] = BASELINES,
    batch_size: int = 16,
    keep_first: bool = True,
    timing_repeats: int = 5,
    seed: int = 0,
    autocast=None,
    progress: bool = True,
    tokenizer=None,
    max_new_tokens: int = 0,
    per_example: bool = False,
    scorer_is_lm: bool = True,
) -> list[dict]:
    """One row per (strategy, keep ratio); see the module docstring. ``strategies``: names in the
    strategy grammar (:mod:`~forgetful.input.strategy`), built on ``model``; ``policies``: strategies
    built elsewhere, by the name to report. ``timing_repeats=0`` leaves out the wall time and peak
    memory (where they would only measure noise, e.g. a tiny model on a CPU); a strategy that reads
    the target (the oracle) is never timed. ``per_example``: each row also carries its examples'
    summed NLL, target tokens and groups. ``scorer_is_lm``: the strategies' scorers read ``model``
    itself (zero-shot), so forgetting at depth shares its first layers with them in the FLOP count."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    model.eval()
    batches = [b.to(device) for b in batches_of(dataset, batch_size, pad_token_id)]
    masks: dict[str, ForgetMask] = {**baseline_masks(model, seed, strategies, device), **policies}
    config = unwrap_model(model).config
    rows = []
    work = [(name, r) for name in masks for r in keep_ratios]
    bar = tqdm(work, desc="eval-forget", disable=not progress)
    for name, ratio in bar:
        bar.set_postfix_str(f"{name} @ {ratio:g}")
        mask = masks[name].to(device)
        if mask.name == "random":  # the same random subsets for every run
            mask.generator = torch.Generator(device=device).manual_seed(seed)
        quality = evaluate_strategy(
            model,
            mask,
            batches,
            keep_ratio=ratio,
            pad_token_id=pad_token_id,
            keep_first=keep_first,
            device=device,
            autocast=autocast,
            tokenizer=tokenizer,
            max_new_tokens=max_new_tokens,
        )
        policy_flops = mask.extra_flops_per_token(int(batches[0].context_ids.shape[1]))
        shared = mask.scorer_layers() if scorer_is_lm else 0
        fr, afr = flops_ratios(
            config, batches, quality.pop("keeps"), policy_flops, forget_layer=mask.forget_layer, shared_layers=shared
        )
        wall = mem = mem_method = policy_ms = None
        if timing_repeats and not mask.reads_target:
            fwd = _forward_fn(model, mask, batches[0], ratio, pad_token_id, keep_first, autocast)
            wall = time_ms(fwd, device, warmup=1, repeats=timing_repeats)
            mem, mem_method = peak_memory_mb(fwd, device)
            policy_ms = time_ms(_policy_fn(mask, batches[0], ratio, keep_first, autocast), device, 1, timing_repeats)
        rows.append(
            {
                "strategy": name,
                "keep_ratio": ratio,
                "forget_layer": mask.forget_layer,
                "reference": mask.reads_target or None,
                "kept_tokens": quality["kept_tokens"],
                "context_tokens": quality["context_tokens"],
                "nll": quality["nll"],
                "ppl": quality["ppl"],
                "nll_unread": quality["nll_unread"],
                "fact_recall": quality["fact_recall"],
                "answer_kept": quality["answer_kept"],
                "rouge": quality["rouge"],
                "oracle_search": quality["oracle"],
                "flops_ratio": fr,
                "attn_flops_ratio": afr,
                "wall_ms": wall,
                "policy_ms": policy_ms,
                # the policy's share of the LM step it serves (the forward on the compressed input)
                "policy_share": policy_ms / (wall - policy_ms) if wall and policy_ms and wall > policy_ms else None,
                "peak_mem_mb": mem,
                "mem_method": mem_method,
                "batch_size": len(batches[0]),
                "rows": len(quality["per_example"]["nll_sum"]),
                "device": str(device),
                **({"per_example": quality["per_example"]} if per_example else {}),
            }
        )
    return rows
