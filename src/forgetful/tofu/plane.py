"""The TOFU experiment on the forget quality - model utility plane: the noise floor (retain runs at
other seeds against the retain run of seed 0), the spread of each point over seeds, each unlearning
method's best point by a stated rule (:data:`BEST_RULE`), and the plot: one line per method through
its grid, its best point marked, masks as points with seed whiskers.

Forget quality spans about 1e-17 (a memorised forget set) to 1 (indistinguishable from the retain
model), so it is drawn on a log axis (an exact 0 at a floor a decade under the smallest positive
value, the axis label saying so).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..reporting import plt
from .grid import point_of

#: the best point's utility floor, as a share of the full run's model utility (seed 0)
UTILITY_SHARE = 0.95
BEST_RULE = (
    f"each method's best point: the highest forget quality among its points (every grid point and "
    f"checkpoint epoch) with model utility >= {UTILITY_SHARE:g} x the full run's, chosen on seed 0 (ties: the "
    "higher utility)"
)
CHECKPOINT_NOTE = "a point at epoch e is its run's epoch-e checkpoint (one schedule of the full length), not a rerun"


def _median_range(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def noise_floor(rows: list[dict]) -> dict:
    """Retain runs at seeds other than 0 against retain at seed 0: their forget quality (the KS
    p-value two retain models reach by training noise alone) and the retain runs' model utility at
    every seed, with its spread (max - min)."""
    retain = sorted((r for r in rows if point_of(r) == "retain"), key=lambda r: r.get("seed", 0))
    floor = {
        "reference": "retain",
        "forget_quality": {str(r.get("seed", 0)): r["forget_quality"] for r in retain if r["run"] != "retain"},
        "model_utility": {str(r.get("seed", 0)): r["model_utility"] for r in retain},
    }
    if len(retain) > 1:
        utility = [r["model_utility"] for r in retain]
        floor["utility_spread"] = max(utility) - min(utility)
    return floor


def seed_spread(rows: list[dict]) -> dict:
    """Per point evaluated at two seeds or more: its seeds and the median, min and max of its forget
    quality and model utility over them."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(point_of(row), []).append(row)
    return {
        point: {
            "seeds": [r.get("seed", 0) for r in group],
            "forget_quality": _median_range([r["forget_quality"] for r in group]),
            "model_utility": _median_range([r["model_utility"] for r in group]),
        }
        for point, group in groups.items()
        if len(group) > 1
    }


def best_points(rows: list[dict]) -> dict:
    """Per unlearning method, the run name of its best point by :data:`BEST_RULE` (None when no point
    keeps the utility)."""
    full = next((r for r in rows if r["run"] == "full"), None)
    floor = UTILITY_SHARE * full["model_utility"] if full is not None else 0.0
    best: dict[str, str | None] = {}
    for row in rows:
        if row["kind"] != "unlearn" or row.get("seed", 0) != 0:
            continue
        method = row["strategy"]
        best.setdefault(method, None)
        if row["model_utility"] < floor:
            continue
        current = next((r for r in rows if r["run"] == best[method]), None)
        key = (row["forget_quality"], row["model_utility"])
        if current is None or key > (current["forget_quality"], current["model_utility"]):
            best[method] = row["run"]
    return best


def frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats on both axes (a higher forget quality and a higher model
    utility), in order of forget quality: the trade-off a method's grid reaches."""
    front, best = [], -float("inf")
    for row in sorted(points, key=lambda r: (-r["forget_quality"], -r["model_utility"])):
        if row["model_utility"] > best:
            front.append(row)
            best = row["model_utility"]
    return front[::-1]


def experiment_summary(rows: list[dict]) -> dict:
    """What ``results.json`` holds beside the rows: the noise floor, the spread over seeds, each
    method's best point and the rule that picked it."""
    return {
        "noise_floor": noise_floor(rows),
        "seed_spread": seed_spread(rows),
        "best_points": best_points(rows),
        "best_rule": BEST_RULE,
    }


def plot_plane(rows: list[dict], summary: dict, path: str | Path, title: str):
    """Model utility against forget quality (log): per unlearning method its seed-0 points (every
    grid point and checkpoint epoch) and a line through their frontier (:func:`frontier`), its best
    point a star; masked-training runs and best points
    evaluated at several seeds at their median with min-max whiskers on both axes; the retain run of
    seed 0 as reference lines, the other retain seeds (the noise floor) as grey crosses, the full
    run as a black square. Returns the figure (closed)."""
    scored = [r for r in rows if r.get("forget_quality") is not None]
    positive = [r["forget_quality"] for r in scored if r["forget_quality"] > 0]
    floor = min(positive) / 10 if positive else 1e-20
    spread = summary.get("seed_spread", {})

    def x(v: float) -> float:
        return max(v, floor)

    fig, ax = plt.subplots(figsize=(8.5, 5.0))
    colors = iter(plt.cm.tab10.colors * 3)
    for method in dict.fromkeys(r["strategy"] for r in scored if r["kind"] == "unlearn"):
        color = next(colors)
        points = sorted(
            (r for r in scored if r["kind"] == "unlearn" and r["strategy"] == method and r.get("seed", 0) == 0),
            key=lambda r: (r["forget_quality"], r["model_utility"]),
        )
        ax.scatter([x(r["forget_quality"]) for r in points], [r["model_utility"] for r in points], s=12, color=color,
                   alpha=0.6, label=f"{method}: {len(points)} points, line: its frontier")  # fmt: skip
        front = frontier(points)
        ax.plot([x(r["forget_quality"]) for r in front], [r["model_utility"] for r in front], "-", lw=1.2, color=color)
        best = summary.get("best_points", {}).get(method)
        row = next((r for r in points if r["run"] == best), None)
        if row is not None:
            _with_whiskers(ax, row, spread.get(point_of(row)), x, color, "*", 14, f"{method} best: {best}")
    masks = [r for r in scored if r["kind"] == "finetune" and r["strategy"] != "answer_only" and r.get("seed", 0) == 0]
    markers = iter("sDv^P<>hX" * 4)
    for row in masks:
        share = f", masked {row['masked_share']:.0%}" if row.get("masked_share") is not None else ""
        _with_whiskers(ax, row, spread.get(point_of(row)), x, next(colors), next(markers), 7, f"{row['run']}{share}")
    for row in scored:
        if point_of(row) == "retain" and row["run"] != "retain":
            ax.scatter([x(row["forget_quality"])], [row["model_utility"]], marker="x", color="0.5", s=30,
                       label=f"noise floor: {row['run']}")  # fmt: skip
        elif point_of(row) == "full" and row["run"] == "full":
            ax.scatter(
                [x(row["forget_quality"])], [row["model_utility"]], marker="s", color="black", s=30, label="full"
            )
    retain = next((r for r in scored if r["run"] == "retain"), None)
    if retain is not None:
        ax.axhline(retain["model_utility"], color="0.35", ls="--", lw=1, label="retain (seed 0)")
        ax.axvline(x(retain["forget_quality"]), color="0.35", ls="--", lw=1)
    ax.set_xscale("log")
    xlabel = "forget quality (KS p-value against retain seed 0, log scale)"
    if any(r["forget_quality"] <= 0 for r in scored):
        xlabel += f"; 0 drawn at {floor:.0e}"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("model utility")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.text(
        0.01, 0.01, f"{CHECKPOINT_NOTE}; whiskers: min-max over seeds; star: {BEST_RULE}.", fontsize=5.5, wrap=True
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return fig


def _with_whiskers(ax, row: dict, spread: dict | None, x, color, marker: str, size: float, label: str) -> None:
    """``row`` as a point, at its median over seeds with min-max whiskers when it has several."""
    if spread is None:
        ax.scatter(
            [x(row["forget_quality"])], [row["model_utility"]], marker=marker, s=size**2, color=color, label=label
        )
        return
    fq, mu = spread["forget_quality"], spread["model_utility"]
    cx, cy = x(fq["median"]), mu["median"]
    ax.errorbar([cx], [cy], xerr=[[cx - x(fq["min"])], [x(fq["max"]) - cx]], yerr=[[cy - mu["min"]], [mu["max"] - cy]],
                fmt=marker, ms=size * 0.7, color=color, capsize=2, lw=0.8,
                label=f"{label} (median of seeds {', '.join(map(str, spread['seeds']))})")  # fmt: skip
