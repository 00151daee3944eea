"""What the TOFU experiment writes for people: ``report.md`` (the recipes, where it ran, one row per
run) and the plot of model utility against forget quality, ``utility_vs_forget_quality.png``.

Forget quality spans about 1e-17 (a memorised forget set) to 1 (indistinguishable from the retain
model), so it is drawn on a log axis (an exact 0 at a floor a decade under the smallest positive
value, the axis label saying so); model utility differs little between runs, so its axis is zoomed
to the runs. Runs are named in a legend with their values, so close points never overprint their
names; the retain run, the target every method aims at, is drawn as reference lines too. Model
utility's 95% interval over the questions is drawn as a whisker on each point.
"""

from __future__ import annotations

from pathlib import Path

from ..reporting import markdown_table, plot_scatter, write_text
from .metrics import UTILITY_METRICS, UTILITY_SETS

PLOT_FILE = "utility_vs_forget_quality.png"
UTILITY_PARTS = tuple(f"{s}_{m}" for s in UTILITY_SETS for m in UTILITY_METRICS)
REPORT_COLUMNS = (
    "run",
    "kind",
    "strategy",
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


def plot_utility_vs_forget_quality(rows: list[dict], path: str | Path, title: str):
    """Every run with a forget quality as a point, with its model utility's interval where the row
    has one; the retain run's values as reference lines. Returns the figure (closed)."""
    scored = [r for r in rows if r.get("forget_quality") is not None]
    retain = next((r for r in scored if r["run"] == "retain"), None)
    references = {"retain (target)": (retain["forget_quality"], retain["model_utility"])} if retain else None
    return plot_scatter(
        {r["run"]: (r["forget_quality"], r["model_utility"]) for r in scored},
        path,
        xlabel="forget quality (KS p-value, log scale)",
        ylabel="model utility",
        title=title,
        logx=True,
        references=references,
        y_intervals={r["run"]: tuple(r["model_utility_ci"]) for r in scored if r.get("model_utility_ci")},
    )


def write_report(out: Path, a, recipes: dict, rows: list[dict], missing: list[str], env: dict) -> None:
    """``report.md`` and the plot in ``out``, from the experiment's config ``a``, its recipes, its
    rows (with their summaries), the runs not done yet and where this call ran."""
    plot_utility_vs_forget_quality(rows, out / PLOT_FILE, f"TOFU {a.forget_split}: masked training vs unlearning")
    write_text(report_text(a, recipes, rows, missing, env), out / "report.md")


def report_text(a, recipes: dict, rows: list[dict], missing: list[str], env: dict) -> str:
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
        lines += [
            "",
            f"Unlearning from the full model: lr {un['learning_rate']:g}, {un['num_train_epochs']:g} epochs, "
            f"weight decay {un['weight_decay']:g}, {_warmup(un)}; each method's loss options:",
            "",
        ]
        lines += [_method_line(r) for r in rows if r.get("kind") == "unlearn" and "loss_options" in r]
    lines += [
        "",
        f"This report was written on {_where(env)}; each run's own machine is in `results.json` (`env`).",
        "",
        "Forget quality: KS-test p-value of the forget truth ratios against the retain run (1 = indistinguishable "
        "from never having trained on the forget set). Model utility: harmonic mean of the nine retain / real-authors "
        "/ world-facts metrics, with its 95% bootstrap interval over the questions (`model_utility_ci`) and its ratio to "
        "the full run's (`utility_vs_full`, paired interval: the same resampled questions for both; single seeds, "
        "so no interval covers the training's randomness). Privleak: Min-K% AUC of forget vs holdout relative to the retain run's (0 = like the "
        "retain model). Metrics as open-unlearning computes them. Epochs and steps as trained, lr the peak "
        "learning rate, seconds of training and of evaluation.",
        "",
        markdown_table([_readable(r) for r in rows], REPORT_COLUMNS, digits=4),
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
    short = {k: f"{row[k]:g}" for k in ("lr", "epochs", "train_seconds", "eval_seconds") if row.get(k) is not None}
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
    state = [(k, v) for k, v in row.get("method_state", {}).items() if not k.endswith("_file")]
    return f"- `{row['strategy']}`: " + (text(options) or "no loss options") + (f"; {text(state)}" if state else "")
