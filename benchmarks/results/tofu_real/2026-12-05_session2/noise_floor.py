"""Issue 34's noise floor from the committed runs (no GPU): the retain model at seeds 1 and 2 against
retain at seed 0 (forget quality: the KS p-value of their forget truth ratios), the retain runs' model
utility at every seed and its spread, and, beside it, the other runs of seeds 1 and 2 scored against
retain seed 0 (their own report scores them against their own seed's retain run).
Run from the repository root: ``python benchmarks/results/tofu_real/2026-12-05_session2/noise_floor.py``."""

import json
from pathlib import Path

from forgetful.tofu.metrics import forget_quality

HERE = Path(__file__).parent
FOLDERS = {0: HERE, 1: HERE / "seed1", 2: HERE / "seed2"}


def truth_ratios(seed: int, run: str) -> list[float]:
    return json.loads((FOLDERS[seed] / run / "forget_per_example.json").read_text())["forget"]["truth_ratio"]


def utility(seed: int, run: str) -> float:
    return json.loads((FOLDERS[seed] / run / "tofu_summary.json").read_text())["model_utility"]


def recipe(seed: int, run: str) -> dict:
    found = json.loads((FOLDERS[seed] / run / "run.json").read_text())
    return {k: found[k] for k in ("epochs", "steps", "lr", "effective_batch_size")}


reference = truth_ratios(0, "retain")
rows = []
for run in ("retain", "full", "full_forget_answers"):
    for seed in (0, 1, 2):
        rows.append(
            {
                "run": run,
                "seed": seed,
                "forget_quality_vs_retain_seed0": forget_quality(truth_ratios(seed, run), reference),
                "model_utility": utility(seed, run),
                **recipe(seed, run),
            }
        )
retain_utility = [r["model_utility"] for r in rows if r["run"] == "retain"]
floor = {
    "reference": "retain seed 0",
    "forget_quality": {str(r["seed"]): r["forget_quality_vs_retain_seed0"] for r in rows if r["run"] == "retain"},
    "model_utility": {str(r["seed"]): r["model_utility"] for r in rows if r["run"] == "retain"},
    "utility_spread": max(retain_utility) - min(retain_utility),
}
out = {"noise_floor": floor, "rows": rows}
(HERE / "noise_floor.json").write_text(json.dumps(out, indent=1) + "\n")
for r in rows:
    print(
        f"{r['run']:20s} seed {r['seed']}: FQ vs retain s0 {r['forget_quality_vs_retain_seed0']:.3g}, "
        f"MU {r['model_utility']:.4f}"
    )
print(f"retain MU spread {floor['utility_spread']:.4f}")
