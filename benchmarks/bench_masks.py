"""What each forget policy costs, as a share of the LM's training step, in the compute-bound setting.

Per policy (the learned MLP, CNN-MLP, RNN, bidirectional RNN, hidden-state and, when registered,
residual; the ``attention_score`` baseline for comparison), at context length n, target m, batch B
and keep ratio ``--keep``, on a randomly initialised LM of ``--arch``'s shape:

* ``policy_ms`` (forward): the policy's keep-logits, exact-budget Gumbel-top-k sampling and the
  gather that builds the compressed LM input (``compress_examples``), without gradients;
* ``policy_train_ms`` (with backward): the same with gradients, plus the policy's REINFORCE
  backward (learned policies only);
* against ``lm_step_ms``: the LM forward + backward at the full length n + m (no policy), and
  ``lm_kept_step_ms``: the LM forward + backward at the kept length b + m, the step the policy
  accompanies in training (``share_of_*`` and ``train_share_of_*``).

The hidden-state and residual policies run a truncated forward through the LM's first layers
(their cost is in the figures); the residual policy keeps sentences (synthetic sentence ids, one
per 24 tokens: the input ids are random). The default is the compute-bound setting of
``bench_forgetting.py`` (``common.COMPUTE_BOUND``: SmolLM2's architecture, n = 4096, m = 32,
batch 16; its docstring says why). Every measurement is timed in ``--rounds`` interleaved rounds
(min / median / max of the round medians, shares computed per round); the JSON is rewritten
atomically after every round; past ``--time-limit`` no new warm-up or round starts.

The issue's goal: policy + gather <= 5% of the LM step (MLP, CNN, RNN; BiRNN and hidden-state
reported).

    python benchmarks/bench_masks.py --out bench_masks_smollm2_h200.json        # GPU, < 8 min
    python benchmarks/bench_masks.py --arch llama-tiny --n 64 --batch 2 --rounds 1 --repeats 1   # CPU
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import ARCHS, COMPUTE_BOUND, Deadline, ResultsFile, build_lm, environment, spread, timed_rounds

from forgetful.input.compression import compress_examples
from forgetful.input.policies import build_mask, mask_names
from forgetful.nll import token_nll

SENTENCE = 24  # tokens per synthetic sentence (the residual policy keeps sentences)


def default_policies() -> str:
    learned = ["mlp", "cnn_mlp", "rnn", "birnn", "hidden_state"] + (["residual"] if "residual" in mask_names() else [])
    return ",".join(learned + ["attention_score"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=COMPUTE_BOUND["arch"], choices=ARCHS)
    p.add_argument("--n", type=int, default=COMPUTE_BOUND["n"])
    p.add_argument("--target", type=int, default=COMPUTE_BOUND["target"])
    p.add_argument("--batch", type=int, default=COMPUTE_BOUND["batch"])
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--policies", default=default_policies())
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every measurement")
    p.add_argument("--time-limit", type=float, default=420.0, help="seconds (0: none); what was measured is kept")
    p.add_argument("--out", default="bench_masks.json")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    deadline = Deadline(a.time_limit or None)
    results = ResultsFile(a.out, environment(device), vars(a))
    model = build_lm(a.arch, a.n + a.target, device)
    V, B, n, m = model.config.vocab_size, a.batch, a.n, a.target
    g = torch.Generator(device=device).manual_seed(0)
    ctx = torch.randint(0, V, (B, n), device=device, generator=g)
    tgt = torch.randint(0, V, (B, m), device=device, generator=g)
    ctx_mask = torch.ones(B, n, dtype=torch.bool, device=device)
    tgt_mask = torch.ones(B, m, dtype=torch.bool, device=device)
    sentences = (torch.arange(n, device=device) // SENTENCE).expand(B, n)

    def lm_step(length: int):
        ids = torch.randint(0, V, (B, length), device=device, generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, -m:] = ids[:, -m:]

        def run():
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = token_nll(model, ids, labels, target_length=m).nll.mean()
            loss.backward()

        return run

    def policy_run(policy, train: bool):
        kept = policy.kept_per_row(n, keep_ratio=a.keep)

        def run():
            policy.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(train), autocast():
                sample = policy.sample(ctx, ctx_mask, keep_ratio=a.keep, num_samples=1, units=sentences)
                compress_examples(ctx, ctx_mask, sample.keep[0], tgt, tgt_mask, kept_length=kept)
                if train:
                    adv = torch.randn(B, device=device)
                    loss = -(adv * sample.log_prob[0]).mean()
            if train:
                loss.backward()

        return run

    policies = {}
    for kind in a.policies.split(","):
        options = {} if kind == "attention_score" else {"hidden_size": a.hidden}
        policies[kind] = build_mask(kind, model, **options).to(device)
    kept = next(iter(policies.values())).kept_per_row(n, keep_ratio=a.keep)
    work = {"lm_step": lm_step(n + m), "lm_kept_step": lm_step(kept + m)}
    for kind, policy in policies.items():
        work[(kind, "forward")] = policy_run(policy, False)
        if policy.learned:
            work[(kind, "train")] = policy_run(policy, True)
    results.set(kept_length=kept + m, full_length=n + m)
    for key, fn in work.items():  # warm-up outside the timed rounds
        if not deadline.allows():
            results.finish(stopped=deadline.reason(f"the warm-up of {key}"))
            return
        fn()
        fn()

    def put_rows(medians: dict, done: int) -> None:
        lm, lm_kept = medians["lm_step"], medians["lm_kept_step"]
        results.set(lm_step_ms=spread(lm), lm_kept_step_ms=spread(lm_kept), rounds_done=done)
        for kind, policy in policies.items():
            fwd, train = medians[(kind, "forward")], medians.get((kind, "train"))
            row = {
                "policy": kind,
                "learned": policy.learned,
                "parameters": sum(q.numel() for q in policy.parameters()),
                "policy_ms": spread(fwd),
                "policy_train_ms": spread(train) if train else None,
                "share_of_lm_step": spread([f / s for f, s in zip(fwd, lm)]),
                "share_of_kept_lm_step": spread([f / s for f, s in zip(fwd, lm_kept)]),
                "train_share_of_lm_step": spread([t / s for t, s in zip(train, lm)]) if train else None,
                "train_share_of_kept_lm_step": spread([t / s for t, s in zip(train, lm_kept)]) if train else None,
                "flops_per_token": policy.extra_flops_per_token(n),
                "rounds_done": done,
            }
            results.put(row, ("policy",))

    _, stopped = timed_rounds(work, device, a.rounds, a.repeats, deadline, after_round=put_rows)
    results.finish(**({"stopped": stopped} if stopped else {}))
    if "lm_step_ms" in results.data:
        print(
            f"LM forward+backward, batch {B}: {results.data['lm_step_ms']['median']:.2f} ms at length {n + m}, "
            f"{results.data['lm_kept_step_ms']['median']:.2f} ms at the kept length {kept + m}"
        )
    for row in results.data["rows"]:
        share = row["share_of_lm_step"]["median"]
        train = row["train_share_of_lm_step"]
        with_backward = f"; with REINFORCE backward {100 * train['median']:5.2f}%" if train else ""
        print(f"{row['policy']:16s} forward+sample+gather {100 * share:5.2f}% of the LM step{with_backward}")


if __name__ == "__main__":
    main()
