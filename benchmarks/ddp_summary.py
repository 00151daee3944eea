"""Summarise the 1- and 2-GPU runs of ``gpu_session.sh ddp`` (one ``bench_ddp.py`` JSON per trainer
and process count): throughput per repetition, the scaling of each trainer (median, min and max
over repetitions of the 2-process throughput over the 1-process median), the per-step losses of the
1- and 2-GPU runs side by side, and, where a profile was taken, the share of the step's device time
spent in collective communication.

    python benchmarks/ddp_summary.py RESULTS_DIR --out RESULTS_DIR/summary.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COMMUNICATION = ("nccl", "allreduce", "all_reduce", "reduce_scatter", "allgather", "all_gather", "gloo")


def communication_ms(profile: list[dict] | None) -> float | None:
    if not profile:
        return None
    return sum(e["ms"] for e in profile if any(k in e["op"].lower() for k in COMMUNICATION))


def summarize(folder: Path) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "summary.json"]
    rows, scaling, losses, profiles = [], {}, {}, {}
    for r in runs:
        reps = r.get("repetitions") or [{k: r[k] for k in ("rows_per_s", "tokens_per_s", "step_s", "losses")}]
        for i, rep in enumerate(reps, 1):
            rows.append(
                {
                    "trainer": r["trainer"],
                    "num_processes": r["processes"],
                    "repetition": i,
                    "tokens_per_s": rep["tokens_per_s"],
                    "rows_per_s": rep["rows_per_s"],
                    "step_s": rep["step_s"],
                    "per_device_batch": r["per_device_batch"],
                    "accumulation": r["config"].get("accumulation", 1),
                    "gpu": r.get("gpu"),
                }
            )
        losses.setdefault(r["trainer"], {})[r["processes"]] = reps[-1]["losses"]
        if r.get("profile"):
            total = sum(e["ms"] for e in r["profile"])
            comm = communication_ms(r["profile"])
            profiles[f"{r['trainer']}_{r['processes']}"] = {
                "top_ops": r["profile"][:8],
                "communication_ms": comm,
                "communication_share_of_top_ops": comm / total if total else None,
            }
    for trainer in sorted({r["trainer"] for r in rows}):
        one = [r["tokens_per_s"] for r in rows if r["trainer"] == trainer and r["num_processes"] == 1]
        two = [r["tokens_per_s"] for r in rows if r["trainer"] == trainer and r["num_processes"] == 2]
        if one and two:
            base = statistics.median(one)
            ratios = [t / base for t in two]
            scaling[trainer] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
                "one_gpu_tokens_per_s": {"median": base, "min": min(one), "max": max(one)},
                "two_gpu_tokens_per_s": {"median": statistics.median(two), "min": min(two), "max": max(two)},
            }
    side_by_side = {t: {"1_gpu": v.get(1), "2_gpu": v.get(2)} for t, v in losses.items()}
    return {"rows": rows, "scaling": scaling, "losses_side_by_side": side_by_side, "profiles": profiles}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    summary = summarize(a.folder)
    a.out.write_text(json.dumps(summary, indent=2) + "\n")
    for trainer, s in summary["scaling"].items():
        print(f"{trainer}: 2 GPUs give {s['median']:.2f}x (range {s['min']:.2f}-{s['max']:.2f}) the 1-GPU tokens/s")


if __name__ == "__main__":
    main()
