"""The paired comparisons quoted in NOTE.md and the README that report.md does not print (no learner in
the run): headroom of the oracle over the best baseline on the rows it was scored on, and the gates.
Run from the repository root: ``python benchmarks/results/forget_cpu/2026-12-08/paired.py``."""

import json
from pathlib import Path

from forgetful.input.stats import compare

HERE = Path(__file__).parent


def show(task: str, keep: str, a: str, b: str, rows: int | None = None) -> None:
    examples = json.loads((HERE / task / "per_example.json").read_text())
    first = examples[f"oracle_{keep}" if a.startswith("oracle") else f"zero_shot_{keep}"][f"{a}@{keep}"]
    c = compare(first, examples[f"zero_shot_{keep}"][f"{b}@{keep}"], rows=rows)
    low, high = c["ci95"]
    print(
        f"{task:9s} keep {keep:5s} {a:36s} - {b:22s} rows {rows or 'all':>3}: "
        f"{c['diff']:+.3f} [{low:+.3f}, {high:+.3f}] p={c['p']:.2g} ({c['groups']} groups)"
    )


for keep in ("0.25", "0.125"):
    show("text", keep, "oracle:rounds=2@sentence", "lexical@sentence", rows=8)
    show("multihop", keep, "identity", "none")
    show("multihop", keep, "lexical:rounds=2@task", "lexical@task")
    show("multihop", keep, "lexical:rounds=2@task", "identity")
    show("multihop", keep, "oracle:exhaustive=0,rounds=2@task", "lexical:rounds=2@task", rows=16)
    show("tofu_qa", keep, "lexical@task", "identity")
    show("tofu_qa", keep, "lexical:rounds=2@task", "lexical@task")
    show("tofu_qa", keep, "oracle:exhaustive=0,rounds=2@task", "lexical@task", rows=8)
