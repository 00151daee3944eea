"""What the TOFU experiment writes for people: ``report.md`` (the recipes, where it ran, the noise
floor, one row per evaluated point, the spread over seeds, each method's best point) and the plot
of model utility against forget quality, ``utility_vs_forget_quality.png`` (:mod:`.plane`).
"""

from __future__ import annotations

from pathlib import Path

from ..reporting import fmt, markdown_table, write_text
from .metrics import UTILITY_METRICS, UTILITY_SETS
from .plane import BEST_RULE, CHECKPOINT_NOTE, plot_plane

PLOT_FILE = "utility_vs_forget_quality.png"
UTILITY_PARTS = tuple(f"{s}_{m}" for s in UTILITY_SETS for m in UTILITY_METRICS)
REPORT_COLUMNS = (
    "run",
    "kind",
    "strategy",
    "seed",
    "epoch",
    "masked_share",
    "forget_quality",
    "model_utility",
    "model_utility_ci",
    "utility_vs_full",
    "utility_vs_full_ci",
    "forget_truth_ratio",
    "forget_prob",
    "privleak",
    "extraction_strength",
    "forget_rouge",
    "trained_share",
    "epochs",
    "steps",
    "lr",
    "train_seconds",
    "eval_seconds",
)


def write_report(out: Path, a, recipes: dict, rows: list[dict], missing: list[str], env: dict, summary: dict) -> None:
    """``report.md`` and the plot in ``out``, from the experiment's config ``a``, its recipes, its
    rows (with their summaries), the runs not done yet, where this call ran and the experiment's
    summary (:func:`~.plane.experiment_summary`)."""
    plot_plane(rows, summary, out / PLOT_FILE, f"TOFU {a.forget_split}: masked training vs unlearning")
    write_text(report_text(a, recipes, rows, missing, env, summary), out / "report.md")


def floor_line(floor: dict) -> str:
    """The noise floor in one line: what two retain models trained at other seeds score."""
    if not floor.get("forget_quality"):
        return "Noise floor: no retain run at another seed yet (--seeds 0,1,2 trains them)."
    fq = ", ".join(f"seed {s} {fmt(v, 4)}" for s, v in floor["forget_quality"].items())
    mu = ", ".join(f"seed {s} {v:.4f}" for s, v in floor["model_utility"].items())
    return (
        f"Noise floor (retain at other seeds against retain seed 0): forget quality {fq}; retain model utility {mu} "
        f"(spread {floor['utility_spread']:.4f})."
    )


def report_text(a, recipes: dict, rows: list[dict], missing: list[str], env: dict, summary: dict) -> str:
    ft = recipes["finetune"]
    notes = ["picked by auto for this model"] if ft.get("asked") == "auto" else []
    if ft.get("overridden"):
        notes.append("set by the user: " + ", ".join(f"{k} {v}" for k, v in ft["overridden"].items()))
    chosen = f"`{ft['name']}`" + (f" ({'; '.join(notes)})" if notes else "")
    lines = [
        f"# TOFU {a.forget_split}: masked training against post-hoc unlearning",
        "",
        f"Initialisation `{a.model}`, data `{a.data_dir or 'embedded'}`, template `{a.template}`.",
        "",
        f"Finetuning recipe {chosen}. lr {ft['learning_rate']:g}, {ft['num_train_epochs']:g} epochs, "
        f"{ft['per_device_train_batch_size']} x {ft['gradient_accumulation_steps']} rows per step per device, "
        f"weight decay {ft['weight_decay']:g}, {_warmup(ft)}, {ft['lr_scheduler_type']} "
        f"schedule, {ft['optim']}, loss averaged per {ft['loss_average']}.",
    ]
    if "unlearn" in recipes:
        un = recipes["unlearn"]
        gridded = any("learning_rate" in r.get("grid", {}) for r in rows)
        lr = "lr per run (the `lr` column)" if gridded else f"lr {un['learning_rate']:g}"
        lines += [
            "",
            f"Unlearning from the full model of the same seed: {lr}, {un['num_train_epochs']:g} epochs, "
            f"weight decay {un['weight_decay']:g}, {_warmup(un)}; each run's loss options:",
            "",
        ]
        finals = [r for r in rows if r.get("kind") == "unlearn" and "loss_options" in r and not r.get("checkpoint_of")]
        lines += [_method_line(r) for r in finals if r.get("seed", 0) == 0]
    lines += [
        "",
        f"This report was written on {_where(env)}; each run's own machine is in `results.json` (`env`).",
        "",
        "Forget quality: KS-test p-value of the forget truth ratios against the retain run of seed 0 (1 = "
        "indistinguishable from never having trained on the forget set). Model utility: harmonic mean of the nine "
        "retain / real-authors / world-facts metrics, with its 95% bootstrap interval over the questions "
        "(`model_utility_ci`) and its ratio to the full run's of seed 0 (`utility_vs_full`, paired interval: the same "
        "resampled questions for both). Privleak: Min-K% AUC of forget vs holdout relative to the retain run's (0 = "
        "like the retain model). Metrics as open-unlearning computes them. Epochs and steps as trained (`epoch`: the "
        f"checkpoint a point is; {CHECKPOINT_NOTE}), lr the peak learning rate, `masked_share` the share of the "
        "forget answers' tokens masked out of the loss, seconds of training and of evaluation.",
        "",
        floor_line(summary["noise_floor"]),
        "",
        markdown_table([_readable(r) for r in rows], REPORT_COLUMNS, digits=4),
    ]
    if summary["seed_spread"]:
        spread = [
            {
                "point": point,
                "seeds": ", ".join(map(str, v["seeds"])),
                **{f"{m} {k}": v[m][k] for m in ("forget_quality", "model_utility") for k in ("median", "min", "max")},
            }
            for point, v in summary["seed_spread"].items()
        ]
        lines += [
            "Over seeds (each seed's forget quality against retain seed 0; median, min and max):",
            "",
            floor_line(summary["noise_floor"]),
            "",
            markdown_table(spread, list(spread[0]), digits=4),
        ]
    if summary["best_points"]:
        lines += [f"Best points ({BEST_RULE}):", ""]
        lines += [
            f"- {m}: " + (f"`{r}`" if r else "no point keeps the utility") for m, r in summary["best_points"].items()
        ]
        lines.append("")
    lines += [
        "Model utility part by part (probability, ROUGE-L recall and truth ratio on each utility set; the harmonic "
        "mean is pulled most by its smallest parts):",
        "",
        markdown_table(rows, ("run", *UTILITY_PARTS), headers=("run", *(_short(c) for c in UTILITY_PARTS)), digits=4),
    ]
    if missing:
        lines += [f"Runs not done yet: {', '.join(missing)}.", ""]
    lines += [f"![model utility vs forget quality]({PLOT_FILE})", ""]
    return "\n".join(lines)


def _short(part: str) -> str:
    """A utility part's column header: ``real_authors_truth_ratio`` -> ``real authors TR``."""
    for metric, short in (("_truth_ratio", " TR"), ("_prob", " prob"), ("_rouge", " ROUGE")):
        if part.endswith(metric):
            return part.removesuffix(metric).replace("_", " ") + short
    return part


def _readable(row: dict) -> dict:
    """The row with its learning rate, epochs and seconds written as short as they are exact."""
    keys = ("lr", "epoch", "epochs", "train_seconds", "eval_seconds")
    short = {k: f"{row[k]:g}" for k in keys if row.get(k) is not None}
    return {**row, **short}


def _where(env: dict) -> str:
    """The machine and versions of :func:`~forgetful.measure.run_environment`, in words."""
    device = env.get("gpu") or f"CPU ({env.get('cpu', 'unknown')})"
    commit = env.get("git_commit") or "unknown"
    return (
        f"{device}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"accelerate {env.get('accelerate')}, commit {commit}, {env.get('date')}"
    )


def _warmup(recipe: dict) -> str:
    """How a recipe warms its learning rate up, in words."""
    if recipe.get("warmup_epochs") is not None:
        return f"{recipe['warmup_epochs']:g} warm-up epoch(s)"
    if recipe.get("warmup_steps"):
        return f"{recipe['warmup_steps']} warm-up steps"
    if recipe.get("warmup_ratio"):
        return f"warm-up over {recipe['warmup_ratio']:g} of the steps"
    return "no warm-up"


def _method_line(row: dict) -> str:
    """One unlearning run's loss options (those left to the method's choice, None, omitted) and what
    they resolved to (``method_state``: RMU's layer, ...), one markdown bullet."""

    def text(items) -> str:
        return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in items)

    options = [(k, v) for k, v in row["loss_options"].items() if v is not None]
    given = dict(options)
    state = [(k, v) for k, v in row.get("method_state", {}).items() if not k.endswith("_file") and given.get(k) != v]
    name = row["run"] if row.get("grid") else row["strategy"]
    return f"- `{name}`: " + (text(options) or "no loss options") + (f"; {text(state)}" if state else "")
