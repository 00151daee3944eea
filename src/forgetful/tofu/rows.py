"""What the TOFU experiment records per evaluated point: the small per-example files to commit,
the row of ``results.json`` built from a run's summary, and model utility's intervals."""

from __future__ import annotations

from ..errors import ForgetfulError
from .metrics import UTILITY_METRICS, UTILITY_SETS, bootstrap_model_utility, percentile_interval


def row_from_summary(row: dict, summary: dict) -> dict:
    """``row`` with the summary's figures (forget quality, model utility and its nine parts, ...)."""
    row.update(
        forget_quality=summary["forget_quality"],
        model_utility=summary["model_utility"],
        privleak=summary.get("privleak"),
        extraction_strength=summary.get("extraction_strength"),
        mia_auc=summary.get("mia_auc"),
        forget_rouge=summary["forget"]["rouge"],
        forget_prob=summary["forget"]["prob"],
        forget_truth_ratio=summary["forget"]["truth_ratio"],
        # model utility's nine parts: which of them moves the harmonic mean
        **{f"{s}_{m}": summary[s][m] for s in UTILITY_SETS for m in UTILITY_METRICS},
    )
    return row


def compact_forget(per_example: dict) -> dict:
    """What forget quality and privleak need, per example (a small file to commit)."""
    f = per_example["forget"]
    out = {
        "meta": per_example["meta"],
        "forget": {k: f[k] for k in ("truth_ratio", "min_k", "extraction_strength", "rouge", "prob") if k in f},
    }
    if "holdout" in per_example:
        out["holdout"] = {"min_k": per_example["holdout"]["min_k"]}
    return out


def compact_utility(per_example: dict) -> dict:
    """What model utility and its interval need, per example of each utility set (a small file to
    commit)."""
    return {"meta": per_example["meta"], **{s: {k: per_example[s][k] for k in UTILITY_METRICS} for s in UTILITY_SETS}}


def add_utility_intervals(rows: list[dict], evals: dict, seed: int = 0) -> None:
    """Each row's model utility with its 95% bootstrap interval over the questions and, when the
    full run is there with a non-zero utility, its ratio to the full run's with the paired
    interval (the same resampled questions for both runs). ``seed`` is the resampling's; at its
    default a row's interval is the one its ``tofu_summary.json`` has (:func:`.evaluation.summarize`)."""
    try:
        samples = bootstrap_model_utility({r["run"]: evals[r["run"]] for r in rows}, seed=seed)
    except ValueError as exc:
        raise ForgetfulError(
            f"model utility's interval compares runs on the same questions, but {exc}: evaluate every run with "
            "the same --max-eval-examples (delete the runs evaluated otherwise to run them again)"
        ) from None
    full_row = next((r for r in rows if r["run"] == "full"), None)
    full = samples.get("full")
    for row in rows:
        utility = samples[row["run"]]
        row["model_utility_ci"] = list(percentile_interval(utility))
        if full_row is not None and full_row["model_utility"] > 0 and full.min() > 0:
            row["utility_vs_full"] = row["model_utility"] / full_row["model_utility"]
            row["utility_vs_full_ci"] = list(percentile_interval(utility / full))
