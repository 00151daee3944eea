"""The CPU gate of the multi-hop task (:mod:`forgetful.data.multihop`), first half: does the real
model read the passage at all? On ``--rows`` eval rows, the target NLL (mean over the answer's
tokens, per row) of SmolLM2-135M-Instruct (float32, CPU) reading

* ``identity``: the whole context;
* ``none``: only the protected part (the question, the chat template, the answer's cue) and token 0;
* ``hops``: the two hop sentences + the protected part (as every strategy below);
* ``hop1`` / ``hop2``: one hop sentence;
* ``decoy``: one sentence of another chain stating the relation asked about (a wrong value of the
  right type): what a reader that does not follow the bridge may keep;
* ``relation``: every sentence of the relation asked about (hop 2 and one decoy per distractor
  chain): what a question-only lexical match keeps (they tie on its words).

``hop2`` against ``decoy`` says whether the model copies the value it is shown; ``identity``
against ``relation`` whether it follows hop 1 to pick the right one among the candidates.

``mean_first_token_nll`` is the NLL of the answer's first token alone: the choice of the entity.
The gate passes when identity beats none by at least ``--margin`` nats (0.5): then keeping the
right sentences matters, and the task can rank selectors. A paired bootstrap over groups (the
asked authors) gives the 95% interval of each difference.

    python benchmarks/multihop_gate.py --rows 40 --out benchmarks/results/forget_cpu/multihop_gate.json
    python benchmarks/multihop_gate.py --distractor-chains 3 --out x.json   # a smaller passage
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from forgetful.atomic import write_text_atomic  # noqa: E402
from forgetful.data.embedded import make_authors  # noqa: E402
from forgetful.data.multihop import DEFAULT_ATTRIBUTES, MultihopOptions, MultihopRow, attribute_sentence, multihop_rows  # noqa: E402
from forgetful.input.compression import compress_examples, compressed_nll  # noqa: E402
from forgetful.input.examples import ForgetCollator, multihop_examples  # noqa: E402
from forgetful.measure import run_environment  # noqa: E402

STRATEGIES = ("identity", "none", "hops", "hop1", "hop2", "decoy", "relation")
# (a, b): the interval of NLL(a) - NLL(b) over groups
PAIRS = (
    ("identity", "none"),
    ("hops", "identity"),
    ("hops", "none"),
    ("hop1", "none"),
    ("hop2", "none"),
    ("hop2", "decoy"),
    ("identity", "relation"),
)


def relation_units(rows: list[MultihopRow], options: MultihopOptions, seed: int) -> list[tuple[int, list[int]]]:
    """Per row: one decoy unit (a distractor chain's sentence of the relation asked about, drawn with
    ``seed``) and the units of every sentence of that relation (hop 2 included)."""
    authors = {a.name: a for a in make_authors(options.num_authors, seed=options.author_seed)}
    rng = random.Random(f"decoy-{seed}")
    out = []
    for row in rows:
        decoys = {attribute_sentence(authors[n], row.attribute) for n in row.distractors}
        units = [i for i, s in enumerate(row.sentences) if s in decoys]
        out.append((rng.choice(units) if units else -2, sorted([*units, row.hops[1]])))
    return out


def keep_masks(batch, hop_units: torch.Tensor, decoy: torch.Tensor, relation: torch.Tensor) -> dict[str, torch.Tensor]:
    """The keep mask of every strategy: the protected tokens and token 0 always, plus its sentences.
    ``decoy`` [B]: one unit per row; ``relation`` [B, k]: k units per row."""
    ctx = batch.context_mask.bool()
    first = torch.zeros_like(ctx)
    first[:, 0] = True
    base = (batch.protect_mask.bool() | first) & ctx
    units = batch.unit_ids
    return {
        "identity": ctx,
        "none": base,
        "hops": base | (batch.fact_mask.bool() & ctx),
        "hop1": base | (units == hop_units[:, :1]),
        "hop2": base | (units == hop_units[:, 1:]),
        "decoy": base | (units == decoy[:, None]),
        "relation": base | (units[:, :, None] == relation[:, None, :]).any(-1),
    }


def paired_bootstrap(a, b, groups, *, resamples: int = 10000, seed: int = 0, level: float = 0.95):
    """``(difference, low, high)``: the mean over rows of ``a - b`` (per-row mean target NLLs) and
    its percentile interval, resampling whole groups with replacement (paired: one resample picks
    the same groups for both)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    count = int(index.max()) + 1
    sums, sizes = np.bincount(index, weights=diff, minlength=count), np.bincount(index, minlength=count)
    picks = np.random.default_rng(seed).multinomial(count, np.full(count, 1.0 / count), size=resamples)
    means = (picks @ sums) / (picks @ sizes)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(low), float(high)


@torch.no_grad()
def score(model, tok, ds, extra: list[tuple[int, list[int]]], batch_size: int) -> dict[str, list[float]]:
    """Per-row mean target NLL of every strategy, in the rows' order (and, as ``<strategy>_first``,
    the NLL of the target's first token: the choice of the entity, before copying the rest of it)."""
    collate = ForgetCollator(tok.pad_token_id)
    out = {s: [] for s in STRATEGIES} | {f"{s}_first": [] for s in STRATEGIES}
    for start in range(0, len(ds), batch_size):
        stop = min(start + batch_size, len(ds))
        rows = [ds[i] for i in range(start, stop)]
        batch = collate(rows)
        hop_units = torch.tensor([r["hop_units"] for r in rows])
        decoy = torch.tensor([d for d, _ in extra[start:stop]])
        relation = torch.tensor([r for _, r in extra[start:stop]])
        for name, keep in keep_masks(batch, hop_units, decoy, relation).items():
            inputs = compress_examples(
                batch.context_ids, batch.context_mask, keep, batch.target_ids, batch.target_mask, tok.pad_token_id
            )
            nll = compressed_nll(model, inputs)
            out[name] += nll.mean_per_row().tolist()
            counts = nll.count_per_row()
            out[f"{name}_first"] += nll.nll[counts.cumsum(0) - counts].tolist()  # the answer's first token
    return out


@torch.no_grad()
def greedy_answers(model, tok, ds, max_new_tokens: int = 12) -> list[str]:
    """The model's greedy answer on the whole context (a reading aid: does it answer with the entity?)."""
    answers = []
    for row in ds:
        ids = torch.tensor([row["context_ids"]])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def git_short() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distractor-chains", type=int, default=MultihopOptions.distractor_chains)
    p.add_argument("--facts-per-author", type=int, default=MultihopOptions.facts_per_author)
    p.add_argument("--filler", type=int, default=MultihopOptions.filler)
    p.add_argument("--attributes", default=",".join(DEFAULT_ATTRIBUTES))
    p.add_argument("--no-answer-cue", action="store_true", help="the bare entity right after the question")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--margin", type=float, default=0.5, help="nats identity must beat none by")
    p.add_argument("--generate", action="store_true", help="also the greedy answers on the whole context")
    p.add_argument("--label", default="defaults", help="a name for this configuration")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/forget_cpu/multihop_gate.json"))
    args = p.parse_args(argv)

    from forgetful.models import load_model

    options = MultihopOptions(
        distractor_chains=args.distractor_chains,
        facts_per_author=args.facts_per_author,
        filler=args.filler,
        attributes=tuple(a for a in args.attributes.split(",") if a),
        answer_cue=not args.no_answer_cue,
    )
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=torch.float32)
    model.eval()
    ds = multihop_examples(tok, part="eval", n=args.rows, seed=args.seed, options=options)
    passage_tokens = [len(m) - sum(m) for m in ds["protect_mask"]]
    context_tokens = [len(c) for c in ds["context_ids"]]
    rows = multihop_rows(args.rows, part="eval", seed=args.seed, options=options)  # the dataset's rows
    assert [list(r.hops) for r in rows] == ds["hop_units"]
    nll = score(model, tok, ds, relation_units(rows, options, args.seed), args.batch)
    groups = list(ds["group"])
    intervals, first_intervals = {}, {}
    for a, b in PAIRS:
        diff, low, high = paired_bootstrap(nll[a], nll[b], groups, seed=args.seed)
        intervals[f"{a}-{b}"] = {"difference": diff, "low": low, "high": high}
        diff, low, high = paired_bootstrap(nll[f"{a}_first"], nll[f"{b}_first"], groups, seed=args.seed)
        first_intervals[f"{a}-{b}"] = {"difference": diff, "low": low, "high": high}
    means = {s: statistics.fmean(nll[s]) for s in STRATEGIES}
    firsts = {s: statistics.fmean(nll[f"{s}_first"]) for s in STRATEGIES}
    gain = means["none"] - means["identity"]
    result = {
        "label": args.label,
        "env": {
            **run_environment("cpu"),
            "git_short": git_short(),
            "machine": "2-core CPU, no GPU",
            "model": args.model,
            "dtype": "float32",
        },
        "options": {**options.as_dict(), "seed": args.seed, "part": "eval", "rows": len(ds)},
        "rows": len(ds),
        "groups": len(set(groups)),
        "passage_tokens": {
            "mean": statistics.fmean(passage_tokens),
            "min": min(passage_tokens),
            "max": max(passage_tokens),
        },
        "context_tokens": {
            "mean": statistics.fmean(context_tokens),
            "min": min(context_tokens),
            "max": max(context_tokens),
        },
        "target_tokens_mean": statistics.fmean(len(t) for t in ds["target_ids"]),
        "mean_nll": means,
        "mean_first_token_nll": firsts,
        "intervals": intervals,
        "first_token_intervals": first_intervals,
        "gate": {"identity_gain_over_none": gain, "margin": args.margin, "passed": gain >= args.margin},
        "per_row": {"group": groups, "attribute": list(ds["attribute"]), "answer": list(ds["answer"]), **nll},
    }
    by_attr = {}
    for i, a in enumerate(ds["attribute"]):
        by_attr.setdefault(a, []).append(i)
    result["mean_nll_by_attribute"] = {
        a: {"rows": len(ix), **{s: statistics.fmean(nll[s][i] for i in ix) for s in STRATEGIES}}
        for a, ix in sorted(by_attr.items())
    }
    if args.generate:
        said = greedy_answers(model, tok, ds)
        result["per_row"]["greedy_identity"] = said
        result["greedy_identity_contains_answer"] = statistics.fmean(
            a.lower() in s.lower() for a, s in zip(ds["answer"], said, strict=True)
        )
    result["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(result, indent=2) + "\n", out)

    pt = result["passage_tokens"]
    print(f"multihop gate [{args.label}]: {len(ds)} eval rows, {result['groups']} groups, passage tokens "
          f"{pt['mean']:.0f} ({pt['min']}-{pt['max']}), options {options.as_dict()}")  # fmt: skip
    print(f"{'strategy':<10} {'mean NLL':>9} {'1st token':>9}")
    for s in STRATEGIES:
        print(f"{s:<10} {means[s]:>9.3f} {firsts[s]:>9.3f}")
    print("paired differences, 95% bootstrap over groups: mean NLL | first-token NLL")
    for name, iv in intervals.items():
        fi = first_intervals[name]
        print(
            f"{name:<18} {iv['difference']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"
            f" | {fi['difference']:+.3f} [{fi['low']:+.3f}, {fi['high']:+.3f}]"
        )
    if "greedy_identity_contains_answer" in result:
        print(
            f"greedy answer on the whole context contains the gold answer: {result['greedy_identity_contains_answer']:.2f}"
        )
    verdict = "PASSED" if result["gate"]["passed"] else "FAILED"
    print(f"gate: identity beats none by {gain:.3f} nats (needs {args.margin}): {verdict}; wrote {out}")
    return result


if __name__ == "__main__":
    main()
