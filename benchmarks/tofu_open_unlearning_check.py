"""Compare ``forgetful eval-tofu`` with open-unlearning's own TOFU evaluation on the same checkpoint
and split, number by number, and record the comparison.

Both sides are read from their ``TOFU_EVAL.json`` files (``forgetful eval-tofu
--open-unlearning-files`` writes ours in open-unlearning's layout): every ``agg_value`` they share,
the largest per-example difference of each metric, whether the greedy generations are identical,
and forget quality recomputed from the per-example truth ratios (each side's own, and each side's
model against the other side's retain model), so that a difference in the KS p-value can be traced
to the per-example values. Numbers only: nothing of open-unlearning's code is read or run here.

    python benchmarks/tofu_open_unlearning_check.py --case chat --ours OURS_DIR --theirs THEIRS_DIR \\
        --ours-retain OURS_RETAIN_DIR --theirs-retain THEIRS_RETAIN_DIR --out results.json \\
        --note "..." --ours-command "..." --theirs-command "..."
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from forgetful.tofu.metrics import forget_quality

_PER_ITEM = ("rougeL_f1", "rouge1_recall", "rougeL_recall", "prob", "avg_loss", "score")


def _load(folder: str) -> dict:
    return json.loads((Path(folder) / "TOFU_EVAL.json").read_text())


def _leaves(value, path=()):
    """(path, number) for every numeric leaf under a value_by_index."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, str(i)))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, float(value)


def _truth_ratios(ev: dict) -> list[float]:
    by_index = ev["forget_truth_ratio"]["value_by_index"]
    return [float(by_index[k]["score"]) for k in sorted(by_index, key=int)]


def compare(ours: dict, theirs: dict) -> dict:
    aggregates, per_item, generations = {}, {}, {}
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        for key in ("agg_value", "auc"):
            if key in a and key in b and a[key] is not None and b[key] is not None:
                label = name if key == "agg_value" else f"{name}.{key}"
                aggregates[label] = {"forgetful": a[key], "open_unlearning": b[key], "abs_diff": abs(a[key] - b[key])}
        for sub in ("forget", "holdout"):
            if isinstance(a.get(sub), dict) and "agg_value" in a[sub]:
                aggregates[f"{name}.{sub}"] = {
                    "forgetful": a[sub]["agg_value"],
                    "open_unlearning": b[sub]["agg_value"],
                    "abs_diff": abs(a[sub]["agg_value"] - b[sub]["agg_value"]),
                }
        va = a.get("value_by_index") or {s: a[s]["value_by_index"] for s in ("forget", "holdout") if s in a}
        vb = b.get("value_by_index") or {s: b[s]["value_by_index"] for s in ("forget", "holdout") if s in b}
        if not va:
            continue
        ours_leaves = dict(_leaves(va))
        worst = 0.0
        for path, x in _leaves(vb):
            if path in ours_leaves and any(k in _PER_ITEM for k in path):
                worst = max(worst, abs(ours_leaves[path] - x))
        per_item[name] = worst
        if name.endswith("ROUGE"):
            same = sum(va[k]["generation"] == vb[k]["generation"] for k in vb)
            same_ref = sum(va[k]["ground_truth"] == vb[k]["ground_truth"] for k in vb)
            generations[name] = {
                "identical_generations": f"{same}/{len(vb)}",
                "identical_references": f"{same_ref}/{len(vb)}",
            }
    return {"aggregates": aggregates, "per_item_max_abs_diff": per_item, "generations": generations}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", required=True)
    p.add_argument("--ours", required=True)
    p.add_argument("--theirs", required=True)
    p.add_argument("--ours-retain")
    p.add_argument("--theirs-retain")
    p.add_argument("--out", required=True)
    p.add_argument("--note", default="")
    p.add_argument("--ours-command", default="")
    p.add_argument("--theirs-command", default="")
    a = p.parse_args()
    ours, theirs = _load(a.ours), _load(a.theirs)
    case = {"note": a.note, "commands": {"forgetful": a.ours_command, "open_unlearning": a.theirs_command}}
    case.update(compare(ours, theirs))
    summary = ("extraction_strength", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_quality")
    summary += ("forget_truth_ratio", "model_utility", "privleak")
    case["summary_max_abs_diff"] = max(case["aggregates"][k]["abs_diff"] for k in summary if k in case["aggregates"])
    case["all_aggregates_max_abs_diff"] = max(v["abs_diff"] for v in case["aggregates"].values())
    if a.ours_retain and a.theirs_retain:
        our_r, their_r = _truth_ratios(_load(a.ours_retain)), _truth_ratios(_load(a.theirs_retain))
        our_m, their_m = _truth_ratios(ours), _truth_ratios(theirs)
        fq = {
            "forgetful (its model vs its retain model)": forget_quality(our_m, our_r),
            "open_unlearning (its model vs its retain model)": forget_quality(their_m, their_r),
            "forgetful's model vs open_unlearning's retain truth ratios": forget_quality(our_m, their_r),
            "open_unlearning's model vs forgetful's retain truth ratios": forget_quality(their_m, our_r),
            "open_unlearning's stored forget_quality": theirs["forget_quality"]["agg_value"],
        }
        case["forget_quality_from_per_example_truth_ratios"] = fq
        case["forget_truth_ratio_max_abs_diff"] = {
            "model": max(abs(x - y) for x, y in zip(our_m, their_m)),
            "retain": max(abs(x - y) for x, y in zip(our_r, their_r)),
        }
    out = Path(a.out)
    record = json.loads(out.read_text()) if out.is_file() else {}
    record.setdefault("cases", {})[a.case] = case
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(record, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x) + "\n"
    )
    print(json.dumps({a.case: {k: case[k] for k in ("summary_max_abs_diff", "all_aggregates_max_abs_diff")}}, indent=2))


if __name__ == "__main__":
    main()
