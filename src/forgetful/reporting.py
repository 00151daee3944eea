"""Results as files people read: JSON, markdown tables and PNG plots (matplotlib, no display)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

from .atomic import atomic_file, write_text_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_json(obj, path: str | os.PathLike) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_jsonable)
        f.write("\n")


def write_text(text: str, path: str | os.PathLike) -> None:
    write_text_atomic(text, path)


def as_json_values(obj):
    """``obj`` as :func:`write_json` writes and ``json.load`` reads it back (tuples as lists, paths as
    strings, ...): for comparing what is in memory with what is in a file."""
    return json.loads(json.dumps(obj, default=_jsonable))


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, set | tuple):
        return list(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, list | tuple) and v and all(isinstance(x, float) for x in v):
        return "[" + ", ".join(fmt(x, digits) for x in v) + "]"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10**-digits):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(
    rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None, digits: int = 3
) -> str:
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_loss_curve(
    steps: Sequence[float],
    losses: Sequence[float],
    path: str | os.PathLike,
    title: str = "",
    marks: dict[str, float] | None = None,
) -> None:
    """The training loss per logged step; ``marks``: labelled vertical lines at steps where the
    training data changes (a curriculum's next phase), so a jump in the curve is explained."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses)
    for label, x in (marks or {}).items():
        ax.axvline(x, color="0.4", linestyle="--", linewidth=1)
        ax.annotate(
            label,
            (x, 0.97),
            xycoords=("data", "axes fraction"),
            xytext=(4, 0),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="0.3",
        )
    _finish(fig, ax, path, "step", "training loss", title)


def _finish(fig, ax, path: str | os.PathLike, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, a light grid, and the PNG written (the figure closed: no display, no leak)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lines(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
    reference: tuple[Sequence[float], Sequence[float], str] | None = None,
    levels: dict[str, float] | None = None,
) -> None:
    """One line per series name; an optional dashed reference line (e.g. the FLOP-ideal); optional
    labelled horizontal ``levels`` (e.g. the full context). The y axis fits the series and the
    levels near them: a level far outside (e.g. no context at all) is written at the axis' edge
    instead of squeezing every line into a corner."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if reference is not None:
        xs, ys, label = reference
        ax.plot(xs, ys, "k--", label=label)
    values = [y for _, ys in series.values() for y in ys if y is not None and math.isfinite(y)]
    if levels and values:
        lo, hi = min(values), max(values)
        span = max(hi - lo, 0.05 * abs(hi), 1e-9)
        near = {k: y for k, y in levels.items() if lo - span <= y <= hi + span}
        lo, hi = min([lo, *near.values()]), max([hi, *near.values()])
        span = max(hi - lo, 1e-9)
        for i, (label, y) in enumerate(levels.items()):
            style = dict(color="0.3", linestyle=("--", ":", "-.")[i % 3], linewidth=1)
            if label in near:
                ax.axhline(y, label=f"{label} ({fmt(y)})", **style)
            else:  # far off the scale: say so at the edge
                edge = hi + 0.08 * span if y > hi else lo - 0.08 * span
                ax.annotate(
                    f"{label}: {fmt(y)} (off the axis)",
                    (0.01, edge),
                    xycoords=("axes fraction", "data"),
                    fontsize=8,
                    color="0.3",
                    va="center",
                )
        ax.set_ylim(lo - 0.15 * span, hi + 0.15 * span)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    _finish(fig, ax, path, xlabel, ylabel, title)


def plot_bars(
    values: dict[str, float],
    path: str | os.PathLike,
    *,
    ylabel: str,
    title: str = "",
    levels: dict[str, float] | None = None,
) -> None:
    """One bar per name, its value written on it; optional labelled horizontal ``levels``."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    bars = ax.bar(list(values), list(values.values()), color="tab:blue", alpha=0.8)
    ax.bar_label(bars, labels=[fmt(v) for v in values.values()], fontsize=8)
    for i, (label, y) in enumerate((levels or {}).items()):
        ax.axhline(y, color="0.3", linestyle=("--", ":")[i % 2], linewidth=1, label=f"{label} ({fmt(y)})")
    if levels:
        ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=15)
    _finish(fig, ax, path, "", ylabel, title)


def plot_scatter(
    points: dict[str, tuple[float, float]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    references: dict[str, tuple[float | None, float | None]] | None = None,
    y_intervals: dict[str, tuple[float, float]] | None = None,
):
    """Points named in a legend (a marker and colour each, with their values), so names never
    overprint however close the points lie; the y axis is zoomed to the points and their intervals
    (padded when they are all equal, e.g. a model utility of 0 everywhere). ``logx``: a log x axis,
    on which x values of 0 (or below) are drawn at a floor a decade under the smallest positive
    one, the x label saying so. ``references``: labelled dashed lines at a point's x and/or y (None:
    no line), e.g. the target a method should reach. ``y_intervals``: a (low, high) whisker per
    named point, e.g. a bootstrap interval. Returns the figure (closed, for inspection)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    floor = None
    if logx:
        positive = [x for x, _ in points.values() if x > 0]
        floor = min(positive) / 10 if positive else 1e-20
        if any(x <= 0 for x, _ in points.values()):
            xlabel = f"{xlabel}; 0 drawn at {floor:.0e}"
    markers = "osD^vP*Xh<>"
    intervals = y_intervals or {}
    for i, (name, (x, y)) in enumerate(points.items()):
        x_drawn = x if floor is None else max(x, floor)
        color = plt.cm.tab10(i % 10)
        ax.scatter(
            [x_drawn],
            [y],
            s=70,
            marker=markers[i % len(markers)],
            color=color,
            alpha=0.85,
            label=f"{name} ({fmt(x)}, {fmt(y)})",
        )
        if name in intervals:
            low, high = intervals[name]
            ax.errorbar([x_drawn], [y], yerr=[[y - low], [high - y]], fmt="none", ecolor=color, capsize=3, lw=1)
    ys = [y for _, y in points.values() if math.isfinite(y)]
    ys += [v for lh in intervals.values() for v in lh if math.isfinite(v)]
    for i, (label, (x, y)) in enumerate((references or {}).items()):
        style = dict(color="0.35", linestyle=("--", ":", "-.")[i % 3], linewidth=1)
        name = f"{label} ({fmt(x) if x is not None else '-'}, {fmt(y) if y is not None else '-'})"
        if x is not None:
            ax.axvline(x, label=name, **style)
        if y is not None:
            ax.axhline(y, label="_nolegend_" if x is not None else name, **style)
            ys.append(y)
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max(0.1 * (hi - lo), 0.02 * max(abs(hi), 1e-3), 0.01)
        ax.set_ylim(lo - pad, hi + pad)
    if logx:
        ax.set_xscale("log")
    if points:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="run (x, y)", title_fontsize=7)
    _finish(fig, ax, path, xlabel, ylabel, title)
    return fig


def plot_ranked_bars(
    panels: dict[str, list[dict]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    title: str = "",
    levels: dict[str, float] | None = None,
) -> None:
    """One panel per key, side by side: horizontal bars ranked best (lowest) first, each bar
    ``{"label", "value", "highlight"?, "interval"?: (low, high)}``; highlighted bars (e.g. learned
    policies) in another colour with their interval as whiskers; ``levels``: labelled vertical lines
    drawn in every panel (e.g. the full context)."""
    count = max(1, len(panels))
    height = max(3.0, 0.32 * max((len(b) for b in panels.values()), default=1) + 1.2)
    fig, axes = plt.subplots(1, count, figsize=(5.2 * count, height), squeeze=False)
    for ax, (name, bars) in zip(axes[0], panels.items()):
        bars = sorted(bars, key=lambda b: b["value"])[::-1]  # best at the top
        ys = list(range(len(bars)))
        colours = ["tab:orange" if b.get("highlight") else "tab:blue" for b in bars]
        ax.barh(ys, [b["value"] for b in bars], color=colours, alpha=0.85)
        for y, b in zip(ys, bars):
            if b.get("interval") is not None:
                lo, hi = b["interval"]
                ax.errorbar(b["value"], y, xerr=[[b["value"] - lo], [hi - b["value"]]], color="k", capsize=3, lw=1)
            ax.annotate(
                fmt(b["value"]), (b["value"], y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7
            )
        ax.set_yticks(ys, [b["label"] for b in bars], fontsize=8)
        values = [b["value"] for b in bars]
        for i, (label, x) in enumerate((levels or {}).items()):
            ax.axvline(x, color="0.3", linestyle=("--", ":")[i % 2], linewidth=1, label=f"{label} ({fmt(x)})")
            values.append(x)
        if values:
            ax.set_xlim(0, max(values) * 1.15)
        if levels:
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_panels(
    panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    title: str = "",
) -> None:
    """Small multiples: one panel per key (its own y axis, named by the key), lines inside."""
    count = max(1, len(panels))
    fig, axes = plt.subplots(1, count, figsize=(3.6 * count, 3.2), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, (xs, ys) in series.items():
            faint = label == "raw" and len(series) > 1  # raw values behind their running mean
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label, alpha=0.3 if faint else 1.0)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


KIND_STYLE = {  # kind -> (colour, marker, legend label)
    "baseline": ("tab:blue", "o", "baseline"),
    "learned": ("tab:orange", "D", "learned (mean over seeds; whiskers: min-max)"),
    "matched": ("tab:green", "s", "equal-FLOPs baseline"),
}


def plot_quality_vs_compute(
    points: Sequence[dict],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    levels: dict[str, float] | None = None,
    worst_shown: float | None = None,
) -> None:
    """Strategies as points ``{"label", "x", "y", "kind", "low"?, "high"?}`` (kinds:
    :data:`KIND_STYLE`), each named beside its point, whiskers from ``low`` to ``high``; ``levels``:
    labelled horizontal lines (the full context); points above ``worst_shown`` are listed in a note
    instead of stretching the axis."""
    fig, ax = plt.subplots(figsize=(9, 6))
    shown = [p for p in points if worst_shown is None or p["y"] <= worst_shown]
    hidden = [p for p in points if p not in shown]
    seen = set()
    for i, p in enumerate(sorted(shown, key=lambda p: (p["x"], p["y"]))):
        colour, marker, legend = KIND_STYLE[p["kind"]]
        ax.scatter(
            [p["x"]], [p["y"]], color=colour, marker=marker, s=45, zorder=3, label=None if p["kind"] in seen else legend
        )
        seen.add(p["kind"])
        if p.get("low") is not None:
            below, above = max(p["y"] - p["low"], 0.0), max(p["high"] - p["y"], 0.0)  # a mean can round past its range
            ax.errorbar([p["x"]], [p["y"]], yerr=[[below], [above]], fmt="none", ecolor=colour, lw=1)
        ax.annotate(
            p["label"],
            (p["x"], p["y"]),
            xytext=(6, (i % 3 - 1) * 7),
            textcoords="offset points",
            fontsize=6.5,
            va="center",
        )
    for i, (label, y) in enumerate((levels or {}).items()):
        ax.axhline(y, color="0.35", linestyle=("--", ":")[i % 2], linewidth=1, label=f"{label} ({fmt(y)})")
    if hidden:
        note = "off the scale: " + ", ".join(
            f"{p['label']} ({fmt(p['y'])})" for p in sorted(hidden, key=lambda p: p["y"])
        )
        fig.text(0.01, 0.01, note, fontsize=6, wrap=True)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_xlim(left=0)
    _finish(fig, ax, path, xlabel, ylabel, title)
