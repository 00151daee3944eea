"""The report of ``forgetful eval-forget``: speedups against the full context (:func:`add_speedups`),
``results.json``, ``report.md`` and the plots (:func:`write_report`)."""

from __future__ import annotations

from pathlib import Path


def add_speedups(rows: list[dict]) -> None:
    """Speedup of each row against the identity at keep 1 (wall time and FLOPs)."""
    ref = next((r for r in rows if r["strategy"] == "identity"), None)
    for r in rows:
        timed = ref is not None and ref["wall_ms"] and r["wall_ms"]
        r["speedup"] = ref["wall_ms"] / r["wall_ms"] if timed else None
        r["flops_speedup_ideal"] = 1.0 / r["flops_ratio"] if r["flops_ratio"] > 0 else None


REFERENCES = {"identity": "full context", "none": "no context"}


def write_report(rows: list[dict], out: Path, title: str = "Forgetting evaluation", notes: str = "") -> str:
    """``results.json``, ``report.md`` with the table, and the plots (target NLL vs keep ratio; the
    measured speedup vs keep ratio when the rows were timed); returns the markdown."""
    from ..reporting import markdown_table, plot_lines, write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(rows, out / "results.json")
    names = [n for n in dict.fromkeys(r["strategy"] for r in rows) if n not in REFERENCES]

    def line(name, key):
        picked = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["keep_ratio"])
        return [r["keep_ratio"] for r in picked], [r[key] for r in picked]

    levels = {label: r["nll"] for n, label in REFERENCES.items() for r in rows if r["strategy"] == n}
    plot_lines(
        {n: line(n, "nll") for n in names},
        out / "nll_vs_keep.png",
        xlabel="keep ratio (share of the context kept)",
        ylabel="target NLL (nats per token)",
        title="Target NLL vs kept share of the context",
        levels=levels,
    )
    timed = all(r.get("speedup") is not None for r in rows)
    if timed:
        ideal = [r for r in rows if r["strategy"] == "recency"] or rows
        plot_lines(
            {n: line(n, "speedup") for n in names},
            out / "speedup_vs_keep.png",
            xlabel="keep ratio",
            ylabel="measured forward speedup",
            title=f"Speedup vs keep ratio ({rows[0]['device']})",
            reference=(
                [r["keep_ratio"] for r in ideal],
                [r["flops_speedup_ideal"] for r in ideal],
                "FLOP-ideal (no policy cost)",
            ),
        )
    cols = ["strategy", "keep_ratio", "kept_tokens", "nll", "ppl", "fact_recall", "flops_ratio", "attn_flops_ratio"]
    if timed:
        cols += ["wall_ms", "speedup", "peak_mem_mb"]
    # the full context and no context do not depend on the keep ratio: one row each, not one per ratio
    shown, seen = [], set()
    for r in sorted(rows, key=lambda r: (-r["keep_ratio"], r["nll"])):
        if r["strategy"] in REFERENCES:
            if r["strategy"] in seen:
                continue
            r = {**r, "keep_ratio": "any"}
            seen.add(r["strategy"])
        shown.append(r)
    table = markdown_table(shown, cols)
    plots = "![target NLL vs keep ratio](nll_vs_keep.png)\n"
    if timed:
        plots += "\n![speedup vs keep ratio](speedup_vs_keep.png)\n"
    md = f"# {title}\n\n{notes}\n\n{table}\n{plots}"
    write_text(md, out / "report.md")
    return md
