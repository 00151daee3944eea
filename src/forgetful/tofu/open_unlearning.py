"""Results in open-unlearning's file layout: ``TOFU_EVAL.json`` (per metric an ``agg_value`` and
``value_by_index``) and ``TOFU_SUMMARY.json``, so tools written for it read ours."""

from __future__ import annotations

import numpy as np

from .metrics import probability

# --------------------------------------------------------------------------------------------
# open-unlearning's file layout
# --------------------------------------------------------------------------------------------

_OU_SETS = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}


def _by_index(values, key: str) -> dict:
    return {str(i): {key: v} for i, v in enumerate(values)}


def to_open_unlearning(per_example: dict, summary: dict) -> tuple[dict, dict]:
    """(``TOFU_EVAL.json``, ``TOFU_SUMMARY.json``) in open-unlearning's layout: per metric an
    ``agg_value`` and ``value_by_index`` keyed by the row number as a string."""
    ev: dict = {}
    for name, pre in _OU_SETS.items():
        s, agg = per_example[name], summary[name]
        n = len(s["question"])
        ev[f"{pre}_Q_A_Prob"] = {
            "agg_value": float(np.mean(probability(s["answer_nll"]))),
            "value_by_index": {
                str(i): {"prob": float(np.exp(-s["answer_nll"][i])), "avg_loss": s["answer_nll"][i]} for i in range(n)
            },
        }
        pert = np.asarray(s["perturbed_nll"], dtype=np.float64)
        ev[f"{pre}_Q_A_PERT_Prob"] = {
            "agg_value": float(np.mean(np.exp(-pert))),
            "value_by_index": {
                str(i): {"prob": np.exp(-pert[i]).tolist(), "avg_loss": pert[i].tolist()} for i in range(n)
            },
        }
        ev[f"{pre}_Q_A_ROUGE"] = {
            "agg_value": agg["rouge"],
            "value_by_index": {
                str(i): {
                    "rouge1_recall": s["rouge1_recall"][i],
                    "rougeL_f1": s["rougeL_f1"][i],
                    "rougeL_recall": s["rouge"][i],
                    "input": s["prompt"][i],
                    "ground_truth": s["reference"][i],
                    "generation": s["generation"][i],
                }
                for i in range(n)
            },
        }
        tr_name = "forget_truth_ratio" if name == "forget" else f"{pre}_Truth_Ratio"
        ev[tr_name] = {"agg_value": agg["truth_ratio"], "value_by_index": _by_index(s["truth_ratio"], "score")}
        if name in ("forget", "retain"):
            para = s["paraphrased_nll"]
            ev[f"{pre}_Q_A_PARA_Prob"] = {
                "agg_value": float(np.mean(probability(para))),
                "value_by_index": {str(i): {"prob": float(np.exp(-para[i])), "avg_loss": para[i]} for i in range(n)},
            }
        else:
            ev[f"{pre}_Q_A_Prob_normalised"] = {
                "agg_value": agg["prob"],
                "value_by_index": _by_index(s["prob"], "prob"),
            }
    if "privleak" in summary:
        f, h = per_example["forget"], per_example["holdout"]
        ev["mia_min_k"] = {
            "forget": {"agg_value": float(np.mean(f["min_k"])), "value_by_index": _by_index(f["min_k"], "score")},
            "holdout": {"agg_value": float(np.mean(h["min_k"])), "value_by_index": _by_index(h["min_k"], "score")},
            "auc": summary["mia_auc"],
            "agg_value": summary["mia_auc"],
        }
        ev["privleak"] = {"agg_value": summary["privleak"]}
        ev["extraction_strength"] = {
            "agg_value": summary["extraction_strength"],
            "value_by_index": _by_index(f["extraction_strength"], "score"),
        }
    ev["forget_quality"] = {"agg_value": summary["forget_quality"]}
    ev["model_utility"] = {"agg_value": summary["model_utility"]}
    ev = dict(sorted(ev.items()))
    names = ("extraction_strength", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_quality")
    names += ("forget_truth_ratio", "model_utility", "privleak")
    short = {k: ev[k]["agg_value"] for k in names if k in ev and ev[k]["agg_value"] is not None}
    return ev, short
