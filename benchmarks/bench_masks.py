"""What a forget policy and the gather cost, against the LM's own training step at the same length.

Per policy (MLP, CNN-MLP, RNN, bidirectional RNN), at context length n and batch B:

* ``policy_ms``: policy forward + exact-budget Gumbel-top-k sampling + the gather that builds the
  compressed LM input (``compress_examples``);
* ``policy_train_ms``: the same plus the policy's REINFORCE backward;
* ``lm_step_ms``: the LM forward + backward at the full length n + m (no policy).

Also the policies that read the LM (``hidden_state``: a truncated forward through its first layers;
the ``attention_score`` baseline: a forward through the scored layers), whose cost is part of the
speedup they leave.

The issue's goal: at n = 1024 with a GPT-2-small-size LM, policy + gather <= 5% of the LM step.

    python benchmarks/bench_masks.py --size gpt2-small --n 1024 --batch 32 --out results.json
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import ARCHS, build_lm, cuda_time_ms, environment, write

from forgetful.input.compression import compress_examples
from forgetful.input.policies import build_mask
from forgetful.nll import token_nll


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="smollm2", choices=ARCHS)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--target", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--policies", default="mlp,cnn_mlp,rnn,birnn,hidden_state,attention_score")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="bench_masks.json")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    )
    model = build_lm(a.arch, a.n + a.target, device)
    V, B, n, m = model.config.vocab_size, a.batch, a.n, a.target
    g = torch.Generator(device=device).manual_seed(0)
    ctx = torch.randint(0, V, (B, n), device=device, generator=g)
    tgt = torch.randint(0, V, (B, m), device=device, generator=g)
    ctx_mask = torch.ones(B, n, dtype=torch.bool, device=device)
    tgt_mask = torch.ones(B, m, dtype=torch.bool, device=device)
    ids = torch.cat([ctx, tgt], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -m:] = tgt

    def lm_step():
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = token_nll(model, ids, labels).nll.mean()
        loss.backward()

    lm_ms, _ = cuda_time_ms(lm_step, repeats=a.repeats)
    results = {"env": environment(device), "config": vars(a), "lm_step_ms": lm_ms, "rows": []}
    print(f"LM forward+backward at length {n + m}, batch {B}: {lm_ms:.2f} ms")
    kept = None
    for kind in a.policies.split(","):
        policy = build_mask(kind, model, hidden_size=a.hidden) if kind != "attention_score" else build_mask(kind, model)
        policy = policy.to(device)
        kept = policy.kept_per_row(n, forget_p=1 - a.keep)
        learned = policy.learned

        def run(train: bool, policy=policy, kept=kept):
            def fn():
                policy.zero_grad(set_to_none=True)
                with torch.set_grad_enabled(train), autocast():
                    sample = policy.sample(ctx, ctx_mask, forget_p=1 - a.keep, num_samples=1)
                    compress_examples(ctx, ctx_mask, sample.keep[0], tgt, tgt_mask, kept_length=kept)
                    if train:
                        adv = torch.randn(B, device=device)
                        loss = -(adv * sample.log_prob[0]).mean()
                if train:
                    loss.backward()

            return fn

        fwd_ms, _ = cuda_time_ms(run(False), repeats=a.repeats)
        train_ms = cuda_time_ms(run(True), repeats=a.repeats)[0] if learned else None
        row = {
            "policy": kind,
            "learned": learned,
            "parameters": sum(q.numel() for q in policy.parameters()),
            "policy_ms": fwd_ms,
            "policy_train_ms": train_ms,
            "share_of_lm_step": fwd_ms / lm_ms,
            "train_share_of_lm_step": train_ms / lm_ms if learned else None,
            "flops_per_token": policy.extra_flops_per_token(n),
        }
        results["rows"].append(row)
        with_backward = (
            f"; with REINFORCE backward {train_ms:7.2f} ms = {100 * train_ms / lm_ms:5.2f}%" if learned else ""
        )
        print(
            f"{kind:16s} forward+sample+gather {fwd_ms:7.2f} ms = {100 * fwd_ms / lm_ms:5.2f}% of the LM step{with_backward}",
            flush=True,
        )
    write(results, a.out)


if __name__ == "__main__":
    main()
