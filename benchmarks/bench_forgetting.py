"""Speed and memory of input forgetting against its ceiling.

For each context length n and keep ratio, times (median of CUDA-event-timed repeats):

* ``train``: one REINFORCE training step of the pipeline: policy forward, Gumbel-top-k sampling,
  gather, LM forward + backward on the compressed batch (targets only get logits), policy
  backward (the optimizer step is left out: its cost does not depend on length);
* ``eval``: policy greedy top-k, gather, LM forward (no grad);
* ``full``: the dense LM alone at the full length n + m (the baseline the speedup is against);
* ``ceiling``: the dense LM alone at the kept length b + m and the same batch (what a
  forgetting pipeline could reach with a free policy and gather).

It prints achieved speedup / ceiling speedup and peak memory against the full-length step.

    python benchmarks/bench_forgetting.py --size gpt2-small --lengths 1024,4096 --batch 32 --out results.json
    python benchmarks/bench_forgetting.py --size gpt2-tiny --lengths 256 --batch 8   # CPU
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import cuda_time_ms, environment, gpt2, peak_mb, write

from forgetful.input.compression import compress_examples
from forgetful.input.policies import build_mask
from forgetful.nll import token_nll


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2-small")
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--keeps", default="1,0.75,0.5,0.25")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--target", type=int, default=32, help="target tokens m after the context")
    p.add_argument("--policy", default="mlp", help="mlp, cnn_mlp, rnn, birnn")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sdpa", default="default", help="default, flash, efficient, cudnn, math")
    p.add_argument(
        "--compile",
        default="",
        help="torch.compile the LM with this mode: default, reduce-overhead, max-autotune-no-cudagraphs (empty: eager)",
    )
    p.add_argument("--out", default="bench_forgetting.json")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    lengths = [int(x) for x in a.lengths.split(",")]
    keeps = [float(x) for x in a.keeps.split(",")]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    backend = contextlib.nullcontext
    if a.sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kind = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[a.sdpa]
        backend = lambda: sdpa_kernel(kind)  # noqa: E731
    results = {"env": environment(device), "config": vars(a), "rows": []}
    model = gpt2(a.size, max(lengths) + a.target, device)
    if a.compile:
        from torch import _dynamo

        _dynamo.config.cache_size_limit = 64  # one graph per (length, grad mode) is expected
        lm = torch.compile(model, mode=a.compile, dynamic=False)
    else:
        lm = model
    policy = build_mask(a.policy, model, learned=True, hidden_size=128).to(device)
    V, B, m = model.config.vocab_size, a.batch, a.target

    def measure_length(n: int) -> None:
        g = torch.Generator(device=device).manual_seed(0)
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
                with torch.set_grad_enabled(train), autocast(), backend():
                    out = token_nll(lm, ids, labels)
                    loss = out.nll.mean()
                if train:
                    loss.backward()

            return run

        def pipeline(keep: float, train: bool):
            def run():
                model.zero_grad(set_to_none=True)
                policy.zero_grad(set_to_none=True)
                with torch.set_grad_enabled(train), autocast(), backend():
                    if train:
                        sample = policy.sample(ctx, ctx_mask, forget_p=1 - keep, num_samples=1)
                        kept = sample.keep[0]
                    else:
                        kept = policy.greedy(ctx, ctx_mask, forget_p=1 - keep)
                    inputs = compress_examples(ctx, ctx_mask, kept, tgt, tgt_mask)
                    out = token_nll(
                        lm,
                        inputs["input_ids"],
                        inputs["labels"],
                        attention_mask=inputs["attention_mask"],
                        position_ids=inputs["position_ids"],
                        target_length=inputs["target_length"],
                    )
                    per_row = out.sum_per_row() / m
                    if train:
                        reward = -per_row.detach()
                        adv = (reward - reward.mean()) / (reward.std() + 1e-6)
                        loss = per_row.mean() - (adv * sample.log_prob[0]).mean()
                if train:
                    loss.backward()

            return run

        full_train_ms, _ = cuda_time_ms(dense(n + m, True), repeats=a.repeats)
        full_eval_ms, _ = cuda_time_ms(dense(n + m, False), repeats=a.repeats)
        full_mem = peak_mb(dense(n + m, True))
        for keep in keeps:
            b = int(round(keep * n))
            row = {"n": n, "m": m, "batch": B, "keep": keep, "kept_length": b + m, "full_length": n + m}
            row["train_ms"], _ = cuda_time_ms(pipeline(keep, True), repeats=a.repeats)
            row["train_ceiling_ms"], _ = cuda_time_ms(dense(b + m, True), repeats=a.repeats)
            row["train_full_ms"] = full_train_ms
            row["eval_ms"], _ = cuda_time_ms(pipeline(keep, False), repeats=a.repeats)
            row["eval_ceiling_ms"], _ = cuda_time_ms(dense(b + m, False), repeats=a.repeats)
            row["eval_full_ms"] = full_eval_ms
            for kind in ("train", "eval"):
                row[f"{kind}_speedup"] = row[f"{kind}_full_ms"] / row[f"{kind}_ms"]
                row[f"{kind}_ceiling_speedup"] = row[f"{kind}_full_ms"] / row[f"{kind}_ceiling_ms"]
                row[f"{kind}_achieved_over_ceiling"] = row[f"{kind}_speedup"] / row[f"{kind}_ceiling_speedup"]
            row["train_peak_mb"] = peak_mb(pipeline(keep, True))
            row["train_full_peak_mb"] = full_mem
            if full_mem:
                row["mem_ratio"] = row["train_peak_mb"] / full_mem
            results["rows"].append(row)
            print(
                f"n={n} keep={keep:.2f}: train {row['train_ms']:.1f} ms, speedup {row['train_speedup']:.2f}x "
                f"(ceiling {row['train_ceiling_speedup']:.2f}x, {100 * row['train_achieved_over_ceiling']:.0f}%); "
                f"eval speedup {row['eval_speedup']:.2f}x ({100 * row['eval_achieved_over_ceiling']:.0f}% of "
                f"ceiling); memory {row.get('mem_ratio', float('nan')):.2f} of full",
                flush=True,
            )

    for n in lengths:
        measure_length(n)
    write(results, a.out)


if __name__ == "__main__":
    main()
