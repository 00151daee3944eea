"""Speed and memory of input forgetting against its ceiling, eager and compiled, with the spread.

For each mode (eager; ``--compile`` regional or full), context length n and keep ratio, with m target
tokens and batch B, on a randomly initialised LM of the chosen shape (``--arch smollm2`` is the
built-in real model's architecture: Llama, 30 layers, grouped-query attention):

* ``full``: the LM alone at length n + m (train: forward + backward; eval: forward);
* ``ceiling``: the LM alone at the kept length b + m, called as a plain user calls it (what a
  forgetting pipeline could reach with a free policy and a free gather);
* ``pipeline``: the policy (train: Gumbel-top-k sample and its REINFORCE backward; eval: greedy
  top-k) + the gather (``compress_examples``, the kept length known on the host) + the LM at b + m;
* eval only, to see where time goes: ``policy`` (greedy alone), ``gather`` (``compress_examples``
  alone), ``lm`` (the LM on a prepared compressed batch), and ``pipeline_mask``: the pipeline as it
  was before, with an all-ones attention mask and sizes read back from the device.

Every measurement is repeated in ``--rounds`` interleaved rounds (each the median of ``--repeats``
CUDA-event-timed runs after warm-up, compile caches warm); speedups and shares of the ceiling are
computed per round and reported as median, min and max. ``--profile`` adds a torch.profiler summary
of one pipeline and one ceiling evaluation at the longest n and smallest keep (top kernels, host
synchronisations).

    python benchmarks/bench_forgetting.py --arch smollm2 --lengths 1024,2048 --batch 16 --compile regional
    python benchmarks/bench_forgetting.py --arch llama-tiny --lengths 128 --batch 4 --rounds 1   # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics

import torch
from common import ARCHS, build_lm, compile_lm, environment, peak_mb, spread, write

from forgetful.input.compression import compress_examples, compressed_nll
from forgetful.input.policies import build_mask
from forgetful.measure import timings_ms
from forgetful.nll import token_nll


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="smollm2", choices=ARCHS)
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--keeps", default="0.75,0.5,0.25")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--target", type=int, default=32, help="target tokens m after the context")
    p.add_argument("--policy", default="mlp", help="mlp, cnn_mlp, rnn, birnn")
    p.add_argument("--repeats", type=int, default=8, help="timed runs per measurement (median)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every measurement")
    p.add_argument("--modes", default="eager", help="eager and/or compile, comma separated")
    p.add_argument("--compile", default="regional", choices=["regional", "full"], help="how the compile mode compiles")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default="bench_forgetting.json")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = [int(x) for x in a.lengths.split(",")]
    results = {"env": environment(device), "config": vars(a), "rows": [], "profiles": {}}

    for mode in a.modes.split(","):
        model = build_lm(a.arch, max(lengths) + a.target, device)
        lm = compile_lm(model, a.compile) if mode == "compile" else model
        policy = build_mask(a.policy, model, learned=True, hidden_size=128).to(device)
        for n in lengths:
            rows, profiles = measure(mode, n, model, lm, policy, a, device, profile_it=a.profile and n == max(lengths))
            results["rows"] += rows
            if profiles:
                results["profiles"][mode] = profiles
        if mode == "compile":
            from torch._dynamo.utils import counters

            results["compile_stats"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break")}
        del model, lm, policy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write(results, a.out)


def measure(mode: str, n: int, model, lm, policy, a, device, profile_it: bool) -> tuple[list[dict], dict]:
    """Every measurement of one (mode, context length), timed in interleaved rounds."""
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    keeps = [float(x) for x in a.keeps.split(",")]
    V, B, m = model.config.vocab_size, a.batch, a.target
    g = torch.Generator(device=device).manual_seed(n)
    ctx = torch.randint(0, V, (B, n), device=device, generator=g)
    tgt = torch.randint(0, V, (B, m), device=device, generator=g)
    ctx_mask = torch.ones(B, n, dtype=torch.bool, device=device)
    tgt_mask = torch.ones(B, m, dtype=torch.bool, device=device)

    def dense(length: int, train: bool):
        ids = torch.randint(0, V, (B, length), device=device, generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, -m:] = ids[:, -m:]

        def run():
            model.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(train), autocast():
                loss = token_nll(lm, ids, labels, target_length=m).nll.mean()
            if train:
                loss.backward()

        return run

    def pipeline(keep: float, train: bool, mask_variant: bool = False):
        kept = policy.kept_per_row(n, forget_p=1 - keep)

        def run():
            model.zero_grad(set_to_none=True)
            policy.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(train), autocast():
                if train:
                    sample = policy.sample(ctx, ctx_mask, forget_p=1 - keep, num_samples=1)
                    chosen = sample.keep[0]
                else:
                    chosen = policy.greedy(ctx, ctx_mask, forget_p=1 - keep)
                if mask_variant:  # before: sizes read back, an all-ones mask passed
                    inputs = compress_examples(ctx, ctx_mask, chosen, tgt, tgt_mask)
                    if inputs["attention_mask"] is None:
                        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                else:
                    inputs = compress_examples(ctx, ctx_mask, chosen, tgt, tgt_mask, kept_length=kept)
                out = compressed_nll(lm, inputs)
                per_row = out.sum_per_row() / m
                if train:
                    reward = -per_row.detach()
                    adv = (reward - reward.mean()) / (reward.std() + 1e-6)
                    loss = per_row.mean() - (adv * sample.log_prob[0]).mean()
            if train:
                loss.backward()

        return run

    def parts(keep: float) -> dict:
        kept = policy.kept_per_row(n, forget_p=1 - keep)
        with torch.no_grad(), autocast():
            chosen = policy.greedy(ctx, ctx_mask, forget_p=1 - keep)
            prepared = compress_examples(ctx, ctx_mask, chosen, tgt, tgt_mask, kept_length=kept)

        def only_policy():
            with torch.no_grad(), autocast():
                policy.greedy(ctx, ctx_mask, forget_p=1 - keep)

        def only_gather():
            with torch.no_grad():
                compress_examples(ctx, ctx_mask, chosen, tgt, tgt_mask, kept_length=kept)

        def only_lm():
            with torch.no_grad(), autocast():
                token_nll(
                    lm,
                    prepared["input_ids"],
                    prepared["labels"],
                    position_ids=prepared["position_ids"],
                    target_length=m,
                )

        return {"policy": only_policy, "gather": only_gather, "lm": only_lm}

    # every measurement of this (mode, n), timed in interleaved rounds
    work = {("full", "train"): dense(n + m, True), ("full", "eval"): dense(n + m, False)}
    for keep in keeps:
        b = policy.kept_per_row(n, forget_p=1 - keep)
        work[("ceiling", "train", keep)] = dense(b + m, True)
        work[("ceiling", "eval", keep)] = dense(b + m, False)
        work[("pipeline", "train", keep)] = pipeline(keep, True)
        work[("pipeline", "eval", keep)] = pipeline(keep, False)
        work[("pipeline_mask", "eval", keep)] = pipeline(keep, False, mask_variant=True)
        for part, fn in parts(keep).items():
            work[(part, "eval", keep)] = fn
    for fn in work.values():  # warm-up (and compilation) outside the timed rounds
        fn()
        fn()
    order = list(work)
    medians: dict = {key: [] for key in order}
    for r in range(a.rounds):
        random.Random(r).shuffle(order)
        for key in order:
            medians[key].append(statistics.median(timings_ms(work[key], device, warmup=1, repeats=a.repeats)))
    full_peak = peak_mb(work[("full", "train")])
    rows = []
    for keep in keeps:
        b = policy.kept_per_row(n, forget_p=1 - keep)
        row = {
            "mode": mode,
            "arch": a.arch,
            "n": n,
            "m": m,
            "batch": B,
            "keep": keep,
            "kept_length": b + m,
            "full_length": n + m,
        }
        for kind in ("train", "eval"):
            full, ceil, pipe = (
                medians[("full", kind)],
                medians[("ceiling", kind, keep)],
                medians[("pipeline", kind, keep)],
            )
            row[f"{kind}_full_ms"] = spread(full)
            row[f"{kind}_ceiling_ms"] = spread(ceil)
            row[f"{kind}_ms"] = spread(pipe)
            row[f"{kind}_speedup"] = spread([f / q for f, q in zip(full, pipe)])
            row[f"{kind}_ceiling_speedup"] = spread([f / c for f, c in zip(full, ceil)])
            row[f"{kind}_share_of_ceiling"] = spread([c / q for c, q in zip(ceil, pipe)])
        mask = medians[("pipeline_mask", "eval", keep)]
        row["eval_mask_ms"] = spread(mask)
        row["eval_mask_share_of_ceiling"] = spread([c / q for c, q in zip(medians[("ceiling", "eval", keep)], mask)])
        for part in ("policy", "gather", "lm"):
            row[f"eval_{part}_ms"] = spread(medians[(part, "eval", keep)])
        if full_peak:
            row["train_peak_mb"] = peak_mb(work[("pipeline", "train", keep)])
            row["train_full_peak_mb"] = full_peak
            row["mem_ratio"] = row["train_peak_mb"] / full_peak
        rows.append(row)
        print(
            f"[{mode}] n={n} keep={keep:.2f}: train {row['train_ms']['median']:.1f} ms, speedup "
            f"{row['train_speedup']['median']:.2f}x ({100 * row['train_share_of_ceiling']['median']:.0f}% of "
            f"ceiling, spread {100 * row['train_share_of_ceiling']['min']:.0f}-"
            f"{100 * row['train_share_of_ceiling']['max']:.0f}%); eval {row['eval_speedup']['median']:.2f}x "
            f"({100 * row['eval_share_of_ceiling']['median']:.0f}%, spread "
            f"{100 * row['eval_share_of_ceiling']['min']:.0f}-{100 * row['eval_share_of_ceiling']['max']:.0f}%; "
            f"with mask + read-back {100 * row['eval_mask_share_of_ceiling']['median']:.0f}%)",
            flush=True,
        )
    profiles = {}
    if profile_it:
        profiles = {
            "pipeline_eval": profile(work[("pipeline", "eval", min(keeps))], cuda),
            "ceiling_eval": profile(work[("ceiling", "eval", min(keeps))], cuda),
            "pipeline_mask_eval": profile(work[("pipeline_mask", "eval", min(keeps))], cuda),
        }
    return rows, profiles


def profile(fn, cuda: bool) -> dict:
    """One run under torch.profiler: the top operators by device time and the host synchronisations."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    with torch_profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "device_time_total" if cuda else "cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:12]
    syncs = sum(
        e.count
        for e in events
        if any(
            s in e.key
            for s in (
                "cudaStreamSynchronize",
                "cudaMemcpyAsync",
                "cudaDeviceSynchronize",
                "aten::item",
                "aten::_local_scalar_dense",
            )
        )
    )
    return {
        "top": [{"op": e.key, "calls": e.count, "ms": getattr(e, key, 0) / 1000} for e in top],
        "host_syncs": syncs,
        "device_ms": sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000 if cuda else None,
    }


if __name__ == "__main__":
    main()
