"""Summarise one TOFU experiment run at several training seeds (``forgetful tofu-experiment --seed S``
into one folder per seed): per run and seed its forget quality, model utility and utility relative
to the full run of the same seed, then the mean, min and max over seeds. A run's row in one seed's
``results.json`` carries an interval over the questions asked; the spread over seeds is what that
interval leaves out (the training's randomness).

    python benchmarks/tofu_seeds.py FOLDER [FOLDER ...] --out seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = ("forget_quality", "model_utility", "utility_vs_full", "forget_prob", "privleak")


def summarize(folders: list[Path]) -> dict:
    """Rows of the runs present in every folder, in the first folder's order."""
    experiments = []
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        experiments.append((results["training_args"]["seed"], {r["run"]: r for r in results["runs"]}))
    seeds = [seed for seed, _ in experiments]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"two folders were trained with the same seed: {seeds}")
    common = [run for run in experiments[0][1] if all(run in rows for _, rows in experiments)]
    summary = {"folders": [str(f) for f in folders], "seeds": seeds, "runs": {}}
    for run in common:
        per_seed = {
            str(seed): {m: rows[run][m] for m in METRICS if rows[run].get(m) is not None} for seed, rows in experiments
        }
        entry = {"per_seed": per_seed}
        for m in METRICS:
            values = [v[m] for v in per_seed.values() if m in v]
            if len(values) == len(seeds):
                entry[m] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        summary["runs"][run] = entry
    return summary


def markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    head = ["run", *(f"{m} seed {s}" for m in ("FQ", "MU", "MU / full") for s in seeds), "MU / full mean [min, max]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, entry in summary["runs"].items():
        cells = [run]
        for m in ("forget_quality", "model_utility", "utility_vs_full"):
            for s in seeds:
                v = entry["per_seed"][str(s)].get(m)
                cells.append("" if v is None else (f"{v:.2e}" if m == "forget_quality" and v < 1e-3 else f"{v:.4f}"))
        ratio = entry.get("utility_vs_full")
        cells.append(f"{ratio['mean']:.4f} [{ratio['min']:.4f}, {ratio['max']:.4f}]" if ratio else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="tofu-experiment folders, one per seed")
    p.add_argument("--out", type=Path, required=True, help="summary JSON; a markdown table is written beside it")
    a = p.parse_args()
    summary = summarize(a.folders)
    a.out.write_text(json.dumps(summary, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
