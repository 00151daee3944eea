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
from pathlib import Path

import torch
from torch import nn

from ..measure import peak_memory_mb, time_ms
from ..nll import unwrap_model
from ..rouge import rouge_l_recall
from ..tokens import pad_token_id as pad_id_of
from .compression import apply_mask, compress_examples, compressed_nll
from .examples import ForgetBatch, ForgetCollator
from .flops import forward_flops
from .policies import ForgetMask, build_mask
from .units import whole_units_kept

# The strategies that are not learned, compared in every report.
BASELINES = ("identity", "none", "random", "recency", "self_information", "attention_score")


def baseline_masks(
    model: nn.Module, seed: int = 0, names: Sequence[str] = BASELINES, device: torch.device | str = "cpu"
) -> dict[str, ForgetMask]:
    """The named baselines, built from the policy registry."""
    return {name: build_mask(name, model, seed=seed, device=device, learned=False) for name in names}


def batches_of(dataset, batch_size: int, pad_token_id: int, max_batches: int | None = None) -> list[ForgetBatch]:
    """Collated evaluation batches, in dataset order."""
    collate = ForgetCollator(pad_token_id)
    n = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)
    return [collate(dataset.select(range(i, min(i + batch_size, n))).to_list()) for i in range(0, n, batch_size)]


def forget_share(keep_ratio: float) -> float:
    """``forget_p`` for a keep ratio (keep 1 forgets nothing)."""
    return 1.0 - keep_ratio if keep_ratio < 1 else 0.0


def score_compressed(
    model: nn.Module,
    mask: ForgetMask,
    batch: ForgetBatch,
    *,
    keep_ratio: float,
    pad_token_id: int,
    keep_first: bool = True,
):
    """The strategy's greedy keep mask at ``keep_ratio`` and the target NLL of the compressed
    inputs: ``(keep [B, n], TokenNLL)``."""
    forget_p = forget_share(keep_ratio)
    keep = mask.greedy(
        batch.context_ids,
        batch.context_mask,
        forget_p=forget_p,
        keep_first=keep_first,
        protect=batch.protect_mask,
        units=batch.units(mask.unit),
    )
    kept = None  # known on the host for rows of one length: the gather then never waits for the device
    if batch.context_length is not None and batch.target_length is not None and batch.protect_mask is None:
        kept = mask.kept_per_row(batch.context_length, forget_p=forget_p, keep_first=keep_first)
    inputs = compress_examples(
        batch.context_ids, batch.context_mask, keep, batch.target_ids, batch.target_mask, pad_token_id, kept
    )
    return keep, compressed_nll(model, inputs)


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
    the batches: the ROUGE-L recall of greedy answers generated from the compressed context.
    ``per_example`` holds each row's summed target NLL, target tokens and group (the paired
    bootstrap's inputs)."""
    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    nll_sum, n_tok, kept, ctx, facts_kept, facts, keeps, rouge = 0.0, 0, 0, 0, 0, 0, [], []
    row_nll, row_tokens, row_group, answer_kept = [], [], [], []
    for batch in batches:
        b = batch.to(device)
        with autocast():
            keep, out = score_compressed(
                model, mask, b, keep_ratio=keep_ratio, pad_token_id=pad_token_id, keep_first=keep_first
            )
        keeps.append(keep)
        nll_sum += float(out.nll.sum())
        n_tok += out.nll.numel()
        row_nll.append(out.sum_per_row().float().cpu())
        row_tokens.append(out.count_per_row().cpu())
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
    return {
        "nll": nll,
        "ppl": math.exp(nll) if nll < 50 else float("inf"),
        "kept_tokens": kept / n_rows if n_rows else float(kept),
        "context_tokens": ctx / n_rows if n_rows else float(ctx),
        "target_tokens": n_tok,
        "fact_recall": facts_kept / facts if facts else None,
        "answer_kept": float(torch.cat(answer_kept).float().mean()) if answer_kept else None,
        "rouge": sum(rouge) / len(rouge) if rouge else None,
        "keeps": keeps,  # each batch's keep mask, on the evaluation device
        "per_example": {
            "nll_sum": torch.cat(row_nll).tolist() if row_nll else [],
            "tokens": torch.cat(row_tokens).tolist() if row_tokens else [],
            "group": torch.cat(row_group).tolist() if row_group else [],
        },
    }


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    next_positions: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
) -> torch.Tensor:
    """Greedy decoding with a KV cache from left-padded prompts whose tokens sit at ``position_ids``
    (a compressed prompt keeps its original positions); the answer's first token is at
    ``next_positions``. Returns ``[B, T]`` new tokens, ``pad_token_id`` after a row's EOS."""
    from transformers import DynamicCache

    cache = DynamicCache(config=unwrap_model(model).config)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    )
    positions, mask = next_positions.clone(), attention_mask
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new = []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1).masked_fill(done, pad_token_id)
        new.append(token)
        if eos_token_id is not None:
            done |= token == eos_token_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        positions += 1
    return torch.stack(new, 1) if new else input_ids.new_zeros(input_ids.shape[0], 0)


def generate_answers(
    model: nn.Module, tokenizer, batch: ForgetBatch, keep: torch.Tensor, *, max_new_tokens: int
) -> list[str]:
    """Greedy answers from each row's kept context tokens, at their original positions."""
    pad = pad_id_of(tokenizer, model)
    short = apply_mask(batch.context_ids, keep & batch.context_mask, pad_token_id=pad)
    # right padding -> left padding: shift each row by its padding, so every prompt ends at one column
    width = short.input_ids.shape[1]
    source = torch.arange(width, device=keep.device).unsqueeze(0) - (width - short.lengths).unsqueeze(1)
    real, pick = source >= 0, source.clamp(min=0)
    ids = short.input_ids.gather(1, pick).masked_fill(~real, pad)
    positions = short.position_ids.gather(1, pick).masked_fill(~real, 0)
    new = greedy_generate(
        model,
        ids,
        real.long(),
        positions,
        batch.context_mask.sum(-1),
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
    )
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def flops_ratios(
    config, batches: list[ForgetBatch], keeps: list[torch.Tensor], policy_flops_per_token: float
) -> tuple[float, float]:
    """(total FLOP ratio, attention FLOP ratio) of compressed vs full inputs, summed per example;
    logits are computed at target positions in both."""
    full = comp = att_full = att_comp = 0.0
    for batch, keep in zip(batches, keeps):
        n = batch.context_mask.sum(-1).tolist()
        m = batch.target_mask.sum(-1).tolist()
        b = (keep & batch.context_mask).sum(-1).tolist()
        for n_i, m_i, b_i in zip(n, m, b):
            full += forward_flops(config, n_i + m_i, m_i)
            comp += forward_flops(config, b_i + m_i, m_i) + policy_flops_per_token * n_i
            att_full += (n_i + m_i) ** 2
            att_comp += (b_i + m_i) ** 2
    return comp / full, att_comp / att_full


def _forward_fn(
    model: nn.Module, mask: ForgetMask, batch: ForgetBatch, keep_ratio: float, pad: int, keep_first: bool, autocast
):
    """One timed unit: policy + gather + LM forward on ``batch``."""

    @torch.no_grad()
    def run():
        with autocast():
            return score_compressed(model, mask, batch, keep_ratio=keep_ratio, pad_token_id=pad, keep_first=keep_first)[
                1
            ].nll

    return run


def _policy_fn(mask: ForgetMask, batch: ForgetBatch, keep_ratio: float, keep_first: bool, autocast):
    """One timed unit: the policy's keep mask alone."""

    @torch.no_grad()
    def run():
        with autocast():
            return mask.greedy(
                batch.context_ids,
                batch.context_mask,
                forget_p=forget_share(keep_ratio),
                keep_first=keep_first,
                protect=batch.protect_mask,
                units=batch.units(mask.unit),
            )

    return run


def evaluate_forgetting(
    model: nn.Module,
    policies: dict[str, ForgetMask],
    dataset,
    *,
    keep_ratios: list[float],
    pad_token_id: int,
    strategies: tuple[str, ...] = BASELINES,
    batch_size: int = 16,
    keep_first: bool = True,
    timing_repeats: int = 5,
    seed: int = 0,
    autocast=None,
    progress: bool = True,
    tokenizer=None,
    max_new_tokens: int = 0,
    per_example: bool = False,
) -> list[dict]:
    """One row per (strategy, keep ratio); see the module docstring. ``timing_repeats=0`` leaves out
    the wall time and peak memory (where they would only measure noise, e.g. a tiny model on a CPU).
    ``per_example``: each row also carries its examples' summed NLL, target tokens and groups."""
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
        fr, afr = flops_ratios(config, batches, quality.pop("keeps"), policy_flops)
        wall = mem = mem_method = policy_ms = None
        if timing_repeats:
            fwd = _forward_fn(model, mask, batches[0], ratio, pad_token_id, keep_first, autocast)
            wall = time_ms(fwd, device, warmup=1, repeats=timing_repeats)
            mem, mem_method = peak_memory_mb(fwd, device)
            policy_ms = time_ms(_policy_fn(mask, batches[0], ratio, keep_first, autocast), device, 1, timing_repeats)
        rows.append(
            {
                "strategy": name,
                "keep_ratio": ratio,
                "kept_tokens": quality["kept_tokens"],
                "context_tokens": quality["context_tokens"],
                "nll": quality["nll"],
                "ppl": quality["ppl"],
                "fact_recall": quality["fact_recall"],
                "answer_kept": quality["answer_kept"],
                "rouge": quality["rouge"],
                "flops_ratio": fr,
                "attn_flops_ratio": afr,
                "wall_ms": wall,
                "policy_ms": policy_ms,
                # the policy's share of the LM step it serves (the forward on the compressed input)
                "policy_share": policy_ms / (wall - policy_ms) if wall and policy_ms and wall > policy_ms else None,
                "peak_mem_mb": mem,
                "mem_method": mem_method,
                "batch_size": len(batches[0]),
                "device": str(device),
                **({"per_example": quality["per_example"]} if per_example else {}),
            }
        )
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Speedup of each row against the identity at keep 1 (wall time and FLOPs)."""
    ref = next((r for r in rows if r["strategy"] == "identity"), None)
    for r in rows:
        timed = ref is not None and ref["wall_ms"] and r["wall_ms"]
        r["speedup"] = ref["wall_ms"] / r["wall_ms"] if timed else None
        r["flops_speedup_ideal"] = 1.0 / r["flops_ratio"] if r["flops_ratio"] > 0 else None


REFERENCES = {"identity": "full context", "none": "no context"}


def write_report(rows: list[dict], out: Path, title: str = "Forgetting evaluation", notes: str = "") -> str:
    """``results.json``, ``report.md`` with the table, and the plots (target NLL vs keep ratio; the
    measured speedup vs keep ratio when the rows were timed); returns the markdown."""
    from ..reporting import markdown_table, plot_lines, write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(rows, out / "results.json")
    names = [n for n in dict.fromkeys(r["strategy"] for r in rows) if n not in REFERENCES]

    def line(name, key):
        picked = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["keep_ratio"])
        return [r["keep_ratio"] for r in picked], [r[key] for r in picked]

    levels = {label: r["nll"] for n, label in REFERENCES.items() for r in rows if r["strategy"] == n}
    plot_lines(
        {n: line(n, "nll") for n in names},
        out / "nll_vs_keep.png",
        xlabel="keep ratio (share of the context kept)",
        ylabel="target NLL (nats per token)",
        title="Target NLL vs kept share of the context",
        levels=levels,
    )
    timed = all(r.get("speedup") is not None for r in rows)
    if timed:
        ideal = [r for r in rows if r["strategy"] == "recency"] or rows
        plot_lines(
            {n: line(n, "speedup") for n in names},
            out / "speedup_vs_keep.png",
            xlabel="keep ratio",
            ylabel="measured forward speedup",
            title=f"Speedup vs keep ratio ({rows[0]['device']})",
            reference=(
                [r["keep_ratio"] for r in ideal],
                [r["flops_speedup_ideal"] for r in ideal],
                "FLOP-ideal (no policy cost)",
            ),
        )
    cols = ["strategy", "keep_ratio", "kept_tokens", "nll", "ppl", "fact_recall", "flops_ratio", "attn_flops_ratio"]
    if timed:
        cols += ["wall_ms", "speedup", "peak_mem_mb"]
    # the full context and no context do not depend on the keep ratio: one row each, not one per ratio
    shown, seen = [], set()
    for r in sorted(rows, key=lambda r: (-r["keep_ratio"], r["nll"])):
        if r["strategy"] in REFERENCES:
            if r["strategy"] in seen:
                continue
            r = {**r, "keep_ratio": "any"}
            seen.add(r["strategy"])
        shown.append(r)
    table = markdown_table(shown, cols)
    plots = "![target NLL vs keep ratio](nll_vs_keep.png)\n"
    if timed:
        plots += "\n![speedup vs keep ratio](speedup_vs_keep.png)\n"
    md = f"# {title}\n\n{notes}\n\n{table}\n{plots}"
    write_text(md, out / "report.md")
    return md


def paired_bootstrap(
    a: dict, b: dict, *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(difference, low, high)``: the token-weighted mean target NLL of ``a`` minus that of ``b``
    on the same examples (``per_example`` dicts of :func:`evaluate_strategy`), and its ``level``
    percentile interval from resampling whole groups (an author's questions; a row without a group
    is its own) with replacement, paired: one resample picks the same groups for both."""
    import numpy as np

    groups = np.asarray(a["group"])
    if len(groups) != len(b["group"]) or (groups != np.asarray(b["group"])).any():
        raise ValueError("paired bootstrap: the two strategies were not scored on the same examples")
    groups = np.where(groups < 0, -1 - np.arange(len(groups)), groups)  # ungrouped rows: each its own
    _, index = np.unique(groups, return_inverse=True)
    count = int(index.max()) + 1
    sums = [
        np.bincount(index, weights=np.asarray(d[k], dtype=np.float64), minlength=count)
        for d in (a, b)
        for k in ("nll_sum", "tokens")
    ]
    na, ta, nb, tb = sums
    point = na.sum() / ta.sum() - nb.sum() / tb.sum()
    rng = np.random.default_rng(seed)
    picks = rng.multinomial(count, np.full(count, 1.0 / count), size=resamples).astype(np.float64)
    diff = (picks @ na) / (picks @ ta) - (picks @ nb) / (picks @ tb)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(diff, [tail, 100 - tail])
    return float(point), float(low), float(high)
