"""``forgetful eval-forget``: what forgetting costs in quality and saves in compute.

For a trained LM and any learned policies, on held-out examples, for every keep ratio and
strategy (identity, none, random, recency, self-information, each policy): target NLL and
perplexity, kept tokens, the FLOP ratio against the full length (policy cost included) and the
attention-only ratio, measured wall time and peak memory of the forward pass (policy + gather +
LM). Writes ``results.json`` (one row per strategy and keep ratio), ``report.md`` and two plots:
perplexity vs keep ratio, and measured speedup vs keep ratio beside the FLOP-ideal line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .compression import compress_examples
from .data import ForgetBatch
from .errors import ForgetfulError
from .flops import forward_flops
from .forget_eval import BASELINES, baseline_masks, batches_of, evaluate_strategy
from .masks import ForgetMask, LearnedForgetMask
from .measure import peak_memory_mb, time_ms
from .token_loss import token_nll, unwrap_model


def parse_keep_ratios(text: str | list) -> list[float]:
    parts = text if isinstance(text, list) else [p for p in str(text).split(",") if p.strip()]
    try:
        ratios = [float(p) for p in parts]
    except ValueError:
        raise ForgetfulError(f"keep ratios must be numbers like 1,0.75,0.5,0.25, got {text!r}") from None
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise ForgetfulError(f"keep ratios must lie in (0, 1], got {text!r}")
    return sorted(set(ratios), reverse=True)


def flops_ratios(config, batches: list[ForgetBatch], keeps: list[torch.Tensor], policy_flops_per_token: float,
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


def _forward_fn(model: nn.Module, mask: ForgetMask, batch: ForgetBatch, keep_ratio: float, pad: int,
                keep_first: bool, autocast):
    forget_p = 1.0 - keep_ratio if keep_ratio < 1 else 0.0

    @torch.no_grad()
    def run():
        with autocast():
            keep = mask.greedy(batch.context_ids, batch.context_mask, forget_p=forget_p, keep_first=keep_first)
            inputs = compress_examples(batch.context_ids, batch.context_mask, keep, batch.target_ids,
                                       batch.target_mask, pad)
            return token_nll(model, inputs["input_ids"], inputs["labels"], attention_mask=inputs["attention_mask"],
                             position_ids=inputs["position_ids"], target_length=inputs["target_length"]).nll

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
) -> list[dict]:
    """One row per (strategy, keep ratio); see the module docstring."""
    import contextlib

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
        if name == "random":  # the same random subsets for every run
            mask.generator = torch.Generator(device=device).manual_seed(seed)
        quality = evaluate_strategy(model, mask, batches, keep_ratio=ratio, pad_token_id=pad_token_id,
                                    keep_first=keep_first, device=device, autocast=autocast)
        forget_p = 1.0 - ratio if ratio < 1 else 0.0
        with torch.no_grad(), autocast():
            keeps = [mask.greedy(b.context_ids, b.context_mask, forget_p=forget_p, keep_first=keep_first)
                     for b in batches]
        policy_flops = mask.extra_flops_per_token(int(batches[0].context_ids.shape[1]))
        fr, afr = flops_ratios(config, batches, keeps, policy_flops)
        fwd = _forward_fn(model, mask, batches[0], ratio, pad_token_id, keep_first, autocast)
        wall = time_ms(fwd, device, warmup=1, repeats=timing_repeats)
        mem, mem_method = peak_memory_mb(fwd, device)
        rows.append({
            "strategy": name,
            "keep_ratio": ratio,
            "kept_tokens": quality["kept_tokens"],
            "context_tokens": quality["context_tokens"],
            "nll": quality["nll"],
            "ppl": quality["ppl"],
            "fact_recall": quality["fact_recall"],
            "flops_ratio": fr,
            "attn_flops_ratio": afr,
            "wall_ms": wall,
            "peak_mem_mb": mem,
            "mem_method": mem_method,
            "batch_size": len(batches[0]),
            "device": str(device),
        })
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Speedup of each row against the identity at keep 1 (wall time and FLOPs)."""
    ref = next((r for r in rows if r["strategy"] == "identity"), None)
    for r in rows:
        r["speedup"] = ref["wall_ms"] / r["wall_ms"] if ref and r["wall_ms"] > 0 else None
        r["flops_speedup_ideal"] = 1.0 / r["flops_ratio"] if r["flops_ratio"] > 0 else None


def write_report(rows: list[dict], out: Path, title: str = "Forgetting evaluation", notes: str = "") -> str:
    """report.md with the table, and the two plots; returns the markdown."""
    from .reporting import markdown_table, plot_lines, write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(rows, out / "results.json")
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    series = {n: ([r["keep_ratio"] for r in rows if r["strategy"] == n],
                  [r["ppl"] for r in rows if r["strategy"] == n]) for n in names}
    plot_lines(series, out / "ppl_vs_keep.png", xlabel="keep ratio", ylabel="target perplexity", logy=True,
               title="Target perplexity vs kept share of the context")
    speed = {n: ([r["keep_ratio"] for r in rows if r["strategy"] == n],
                 [r["speedup"] for r in rows if r["strategy"] == n]) for n in names if n not in ("identity", "none")}
    ideal_rows = [r for r in rows if r["strategy"] == "recency"] or rows
    plot_lines(speed, out / "speedup_vs_keep.png", xlabel="keep ratio", ylabel="measured forward speedup",
               title=f"Speedup vs keep ratio ({rows[0]['device']})",
               reference=([r["keep_ratio"] for r in ideal_rows], [r["flops_speedup_ideal"] for r in ideal_rows],
                          "FLOP-ideal (no policy cost)"))
    cols = ["strategy", "keep_ratio", "kept_tokens", "nll", "ppl", "fact_recall", "flops_ratio", "attn_flops_ratio",
            "wall_ms", "speedup", "peak_mem_mb"]
    table = markdown_table(sorted(rows, key=lambda r: (-r["keep_ratio"], r["nll"])), cols)
    md = (f"# {title}\n\n{notes}\n\n{table}\n"
          "![perplexity vs keep ratio](ppl_vs_keep.png)\n\n![speedup vs keep ratio](speedup_vs_keep.png)\n")
    write_text(md, out / "report.md")
    return md


@dataclass
class EvalForgetArguments:
    model: str = field(metadata={"help": "The LM folder (save_pretrained), e.g. a train-forget OUT/lm."})
    out: str = field(metadata={"help": "Output folder for results.json, report.md and plots."})
    mask_dir: list[str] = field(default_factory=list, metadata={"help": "Saved learned policies to evaluate (folders)."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out text/JSON file; default: embedded biographies."})
    keep: str = field(default="1,0.75,0.5,0.25", metadata={"help": "Keep ratios, comma separated."})
    strategies: str = field(default=",".join(BASELINES), metadata={"help": "Baselines to include."})
    context_length: int = field(default=256)
    target_length: int = field(default=32)
    max_examples: int = field(default=256)
    batch_size: int = field(default=16)
    timing_repeats: int = field(default=5)
    embedded_seed: int = field(default=1234, metadata={"help": "Seed of the embedded held-out examples."})
    seed: int = field(default=0)
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on a GPU that supports it)."})


def run_eval_forget(a: EvalForgetArguments) -> list[dict]:
    from .data import load_forget_examples
    from .modeling import load_model

    keep_ratios = parse_keep_ratios(a.keep)
    strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in BASELINES]
    if unknown:
        raise ForgetfulError(f"unknown strategies {', '.join(unknown)}; baselines are {', '.join(BASELINES)}")
    if a.batch_size < 1 or a.max_examples < 1 or a.timing_repeats < 1:
        raise ForgetfulError("batch_size, max_examples and timing_repeats must be positive")
    model, tokenizer = load_model(a.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    policies = {}
    for d in a.mask_dir:
        policy = LearnedForgetMask.from_pretrained(d, model)
        name = Path(d).name if Path(d).name not in ("policy",) else Path(d).parent.name
        policies[name] = policy
    ds = load_forget_examples(a.eval_file, tokenizer, context_length=a.context_length, target_length=a.target_length,
                              max_examples=a.max_examples, seed=a.embedded_seed)
    bf16 = a.bf16 if a.bf16 is not None else (device == "cuda" and torch.cuda.is_bf16_supported())
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else None
    rows = evaluate_forgetting(model, policies, ds, keep_ratios=keep_ratios, pad_token_id=tokenizer.pad_token_id,
                               strategies=strategies, batch_size=a.batch_size, timing_repeats=a.timing_repeats,
                               seed=a.seed, autocast=autocast)
    add_speedups(rows)
    notes = (f"Model `{a.model}`, data `{a.eval_file or 'embedded biographies'}`, {len(ds)} examples, device "
             f"{device}{', bf16' if bf16 else ''}. NLL/perplexity are over target tokens. FLOP ratios count the "
             "policy's own cost; wall time and peak memory are for one forward of the first batch (policy + gather "
             "+ LM), median of repeats.")
    write_report(rows, Path(a.out), notes=notes)
    best = min((r for r in rows if r["keep_ratio"] < 1 and r["strategy"] != "identity"), key=lambda r: r["nll"],
               default=None)
    if best:
        print(f"wrote {a.out}/report.md; best at keep<1: {best['strategy']} @ {best['keep_ratio']} "
              f"(nll {best['nll']:.3f}, ppl {best['ppl']:.2f})")
    if any(not math.isfinite(r["nll"]) for r in rows):
        raise ForgetfulError("some strategies gave a non-finite NLL; see results.json")
    return rows
