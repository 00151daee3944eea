"""Results as files people read: JSON, markdown tables and PNG plots (matplotlib, no display)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_json(obj, path: str | os.PathLike) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(text: str, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, set | tuple):
        return list(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def fmt(v, digits: int = 3) -> str:
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


def plot_loss_curve(steps: Sequence[float], losses: Sequence[float], path: str | os.PathLike, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses)
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
) -> None:
    """One line per series name; an optional dashed reference line (e.g. the FLOP-ideal)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if reference is not None:
        xs, ys, label = reference
        ax.plot(xs, ys, "k--", label=label)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    _finish(fig, ax, path, xlabel, ylabel, title)


def plot_scatter(
    points: dict[str, tuple[float, float]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
) -> None:
    """Labelled points (e.g. forget quality vs model utility per strategy)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=60)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if logx:
        ax.set_xscale("log")
    _finish(fig, ax, path, xlabel, ylabel, title)
