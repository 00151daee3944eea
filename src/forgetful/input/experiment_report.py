"""The forget experiment's ``report.md`` and plots: policy training (selection statistics, labelled
so), the oracle's headroom, every strategy per protocol, the learned rows' paired comparisons and a
summary over seeds, ranked bars and a quality-vs-FLOPs plot per protocol and keep ratio."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..reporting import fmt, markdown_table, plot_quality_vs_compute, plot_ranked_bars, write_text
from .policies import is_learned

COLUMNS = [
    "label",
    "keep_ratio",
    "nll",
    "nll_unread",
    "rouge",
    "answer_kept",
    "fact_recall",
    "kept_tokens",
    "flops_ratio",
    "policy_share",
    "lm_sequences",
    "epochs",
    "rows",
]
COMPARISONS = (
    ("vs_matched", "vs best compute-matched"),
    ("vs_prior", "vs own prior"),
    ("vs_equal_flops", "vs equal FLOPs"),
)


def _label(r: dict) -> str:
    if r.get("label"):
        return r["label"]
    if r.get("flops_matched_for"):
        return f"{r['strategy']} @ {r['keep_ratio_used']:g} (FLOPs of {r['flops_matched_for']})"
    return r["strategy"] + (" (oracle, reads the target)" if r.get("reference") else "")


def _cell(c: dict | None) -> str:
    if not c:
        return ""
    low, high = c["ci95"]
    star = "**" if high < 0 or low > 0 else ""
    return f"{star}{c['diff']:+.3f} [{low:+.3f}, {high:+.3f}]{star} p={fmt(c['p'])} ({c['baseline']})"


def _gap(c: dict | None) -> str:
    if not c:
        return ""
    room = f"headroom {c['headroom']:.3f} [{c['headroom_ci95'][0]:.3f}, {c['headroom_ci95'][1]:.3f}]"
    if c.get("gap_closed") is None:
        return f"{room}: no gap to read"
    low, high = c["gap_closed_ci95"]
    return f"{c['gap_closed']:.0%} [{low:.0%}, {high:.0%}] of {room} ({c['oracle_rows']} rows)"


def comparison_table(rows: list[dict]) -> str:
    learned = sorted(
        (r for r in rows if r["protocol"] in ("zero_shot", "finetuned") and r.get("learner")),
        key=lambda r: (r["protocol"] != "zero_shot", -r["keep_ratio"], r["strategy"], r["learner"], r["seed"]),
    )
    if not learned:
        return ""
    table = [
        {
            "protocol": r["protocol"],
            "learned": r["label"],
            "keep": r["keep_ratio"],
            "nll": r["nll"],
            **{title: _cell(r.get(key)) for key, title in COMPARISONS},
            "gap closed (target)": _gap(r.get("gap")),
            "gap closed (unread tokens)": _gap(r.get("gap_unread")),
        }
        for r in learned
    ]
    columns = list(table[0])
    columns = [c for c in columns if any(t[c] not in ("", None) for t in table)]
    return markdown_table(table, columns)


def seed_summary(rows: list[dict]) -> str:
    """Per learned policy, learner, protocol and keep: how many seeds beat the compute-matched
    baseline and the prior with the 95% interval below 0."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["protocol"] in ("zero_shot", "finetuned") and r.get("learner"):
            groups.setdefault((r["protocol"], r["keep_ratio"], r["strategy"], r["learner"]), []).append(r)
    if not groups:
        return ""

    def wins(rs, key):
        have = [r[key] for r in rs if r.get(key)]
        return f"{sum(c['ci95'][1] < 0 for c in have)} of {len(have)}" if have else ""

    def mean(rs, key):
        have = [r[key]["diff"] for r in rs if r.get(key)]
        return sum(have) / len(have) if have else ""

    table = [
        {
            "protocol": p,
            "keep": k,
            "policy": s,
            "learner": learner,
            "seeds": len(rs),
            "below 0 vs matched": wins(rs, "vs_matched"),
            "mean diff vs matched": mean(rs, "vs_matched"),
            "below 0 vs prior": wins(rs, "vs_prior"),
            "mean diff vs prior": mean(rs, "vs_prior"),
        }
        for (p, k, s, learner), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2], kv[0][3]))
    ]
    return markdown_table(table, list(table[0]))


def write_experiment_report(rows: list[dict], config, training, out: Path, configs: list[dict] | None = None) -> None:
    """``report.md`` and its plots (``config``: the experiment's :class:`~.experiment.ForgetExperimentConfig`;
    ``configs``: the configurations recorded in ``results.json`` with the runs each wrote, listed at the end
    in place of ``config`` when given)."""
    parts = [
        f"# Input forgetting, fair protocol: {config.task}\n",
        f"Base LM `{config.model}`. **Zero-shot**: every strategy on the frozen base LM (learned policies were fitted "
        "on it, the LM never). **Finetuned**: each strategy on an LM finetuned on its own keep sets, every LM on the "
        f"same rows for the same epochs (`lm_sequences`); learned policies frozen meanwhile. LM learning rate "
        f"{training.learning_rate:g}, batch {training.per_device_train_batch_size}, seed {training.seed}. Comparisons are "
        "paired over held-out groups (authors, or blocks of windows): the difference of mean target NLL (negative: the "
        "learned policy is better), its 95% bootstrap interval (bold where it excludes 0) and the sign-flip p. "
        "Compute-matched: baselines whose FLOPs ratio is at most the learned row's. `nll_unread`: the tokens after "
        "the target, which no strategy and no oracle read. `policy_share`: the policy's time over the LM forward.\n",
    ]
    trained = [r for r in rows if r["protocol"] == "policy_training"]
    if trained:
        parts += [
            "## Policy training\n",
            "`val_nll_prior` / `val_nll_selected`: the validation rows (training rows held out of fitting) of the "
            "untrained prior and of the version kept. **A selection statistic**: the version was chosen on these rows, "
            "so the difference overstates the gain; the results are the held-out rows' below.\n",
            markdown_table(
                sorted(trained, key=lambda r: (-r["keep_ratio"], r["strategy"], r["learner"], r["seed"])),
                [
                    "strategy",
                    "learner",
                    "seed",
                    "keep_ratio",
                    "prior",
                    "val_nll_prior",
                    "val_nll_selected",
                    "chosen",
                    "policy_steps",
                    "lm_tokens_forward",
                    "lm_tokens_backward",
                    "seconds_learning",
                ],
            ),
        ]
        for r in trained:
            name = f"{r['strategy'].split('@')[0].split(':')[0]}_{r['learner']}_{r['keep_ratio']:g}_s{r['seed']}"
            parts.append(f"![{name}](policies/{name}/training.png)\n")
    oracle = [r for r in rows if r.get("reference")]
    if oracle:
        for r in oracle:
            r["search"] = (
                f"row mean {r['oracle_search']['start_nll']:.3f} -> {r['oracle_search']['oracle_nll']:.3f}; "
                f"{r['oracle_search']['rows_moved']} of {r['oracle_search']['rows']} rows moved, "
                f"{r['oracle_search']['exhaustive_rows']} exhaustive"
                if r.get("oracle_search")
                else ""
            )
        parts += [
            "## Headroom: the oracle (reads the target; never a baseline)\n",
            "`search`: the mean of the rows' NLLs (unweighted) from the start keep set (the best zero-shot "
            "baseline's) to the oracle's; `nll` weights the rows by their target tokens.\n",
            markdown_table(oracle, ["strategy", "keep_ratio", "rows", "nll", "nll_unread", "flops_ratio", "search"]),
        ]
    table = comparison_table(rows)
    if table:
        parts += ["## Learned policies against the baselines (held-out rows)\n", table]
        parts += ["### Over seeds\n", seed_summary(rows)]
    for protocol in ("zero_shot", "finetuned"):
        picked = sorted(
            (r for r in rows if r["protocol"] == protocol and not r.get("reference")),
            key=lambda r: (-r["keep_ratio"], r["nll"]),
        )
        if not picked:
            continue
        for r in picked:
            r["label"] = _label(r)
        shown = [c for c in COLUMNS if any(r.get(c) is not None for r in picked)]
        parts += [f"## {protocol.replace('_', ' ')}\n", markdown_table(picked, shown)]
        parts += _plots(picked, protocol, config, out)
    if configs:
        for entry in configs:
            recorded = {k: v for k, v in entry["config"].items() if k != "training"}
            parts.append(f"\nConfig of {', '.join(entry['runs'])}: `{recorded}`\n")
    else:
        parts.append(f"\nConfig: `{asdict(config)}`\n")
    write_text("\n".join(parts), out / "report.md")


def _plots(picked: list[dict], protocol: str, config, out: Path) -> list[str]:
    links = []
    panels = {}
    for keep in sorted({r["keep_ratio"] for r in picked}, reverse=True):
        panels[f"keep {keep:g}"] = [
            {"label": r["label"], "value": r["nll"], "highlight": is_learned(r["strategy"]), "interval": None}
            for r in picked
            if r["keep_ratio"] == keep and r["strategy"] not in ("identity", "none")
        ]
    identity = next((r["nll"] for r in picked if r["strategy"] == "identity"), None)
    references = {"full context": identity} if identity is not None else {}
    if any(panels.values()):
        plot_ranked_bars(
            panels,
            out / f"nll_{protocol}.png",
            xlabel="target NLL (nats per token)",
            title=f"{config.task}: {protocol.replace('_', ' ')} (orange: learned)",
            levels=references,
        )
        links.append(f"![{protocol}](nll_{protocol}.png)\n")
    for keep in sorted({r["keep_ratio"] for r in picked}, reverse=True):
        points = compute_points([r for r in picked if r["keep_ratio"] == keep])
        if len(points) < 2:
            continue
        at = [r for r in picked if r["keep_ratio"] == keep and r["strategy"] == "identity"]
        name = f"nll_vs_flops_{protocol}_{keep:g}.png"
        plot_quality_vs_compute(
            points,
            out / name,
            xlabel="FLOPs ratio to the full context (the strategy's own scoring included)",
            ylabel="target NLL (nats per token)",
            title=f"{config.task}, {protocol.replace('_', ' ')}, keep {keep:g}: quality vs compute",
            levels={"full context": at[0]["nll"]} if at else None,
            worst_shown=(at[0]["nll"] + 1.5) if at else None,
        )
        links.append(f"![quality vs FLOPs at keep {keep:g}]({name})\n")
    return links


def compute_points(rows: list[dict]) -> list[dict]:
    """One point per strategy for the quality-vs-FLOPs plot: baselines as they are, each learner's
    policy as its mean over seeds (whiskers: the seeds' range), each equal-FLOPs keep ratio once;
    the references (full and no context, the oracle) are left out."""
    points, learned, matched = [], {}, {}
    for r in rows:
        if r["strategy"] in ("identity", "none") or r.get("reference") or r.get("flops_ratio") is None:
            continue
        if r.get("learner"):
            learned.setdefault((r["strategy"], r["learner"]), []).append(r)
        elif r.get("flops_matched_for"):
            matched[(r["strategy"], r["keep_ratio_used"])] = r
        else:
            points.append({"label": r["strategy"], "x": r["flops_ratio"], "y": r["nll"], "kind": "baseline"})
    for (strategy, learner), rs in learned.items():
        ys = [r["nll"] for r in rs]
        points.append(
            {
                "label": f"{strategy} [{learner}, {len(rs)} seed{'s' if len(rs) > 1 else ''}]",
                "x": sum(r["flops_ratio"] for r in rs) / len(rs),
                "y": sum(ys) / len(ys),
                "low": min(ys),
                "high": max(ys),
                "kind": "learned",
            }
        )
    for (strategy, used), r in matched.items():
        points.append({"label": f"{strategy} @ keep {used:g}", "x": r["flops_ratio"], "y": r["nll"], "kind": "matched"})
    return points
