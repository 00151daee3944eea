"""The forget experiment's folder: ``results.json`` (``env`` and the rows) and ``per_example.json``
written under one file lock (several processes, one per keep ratio, may share a folder), the paired
bootstrap intervals of learned rows against the best baseline, and ``report.md`` with its plots."""

from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import asdict
from pathlib import Path

from ..errors import ForgetfulError
from ..reporting import as_json_values, markdown_table, plot_ranked_bars, write_json, write_text
from .evaluation import paired_bootstrap
from .policies import mask_names, parse_strategy
from .reinforce import ForgetTrainingConfig

# -- the results folder: shared by processes, one lock ---------------------------------------


@contextlib.contextmanager
def _locked(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ForgetfulError(f"{path} is not valid JSON: remove it to start the experiment again") from None


def read_results(out: Path) -> tuple[dict, list[dict]]:
    """``(env, rows)`` of an experiment folder (empty when it has none yet)."""
    found = _read_json(out / "results.json", {})
    if isinstance(found, list):  # written before results.json carried its environment
        return {}, found
    if not isinstance(found, dict) or not isinstance(found.get("rows", []), list):
        raise ForgetfulError(f"{out / 'results.json'} is not the results of a forget experiment")
    return found.get("env", {}), found.get("rows", [])


def record_run(out: Path, run: str, rows: list[dict], per_example: dict, env: dict, config, training) -> list[dict]:
    """Replace ``run``'s rows and examples in the folder's files (atomically, under the lock) and
    write the report again; returns every row. ``results.json`` keeps every configuration that
    wrote a run, with the runs it wrote (``configs``): processes of other keep ratios or strategy
    lists share the folder."""
    with _locked(out):
        _, found = read_results(out)
        found = [r for r in found if r["run"] != run] + rows
        examples = _read_json(out / "per_example.json", {})
        examples[run] = per_example
        add_intervals(found, examples, config.bootstrap, training.seed)
        write_json(examples, out / "per_example.json")
        config_values = as_json_values({**asdict(config), "training": asdict(training)})
        configs = _configs_with(_read_json(out / "results.json", {}), run, config_values)
        write_json({"env": env, "configs": configs, "rows": found}, out / "results.json")
        _report(found, config, training, out)
    return found


def _configs_with(results, run: str, config: dict) -> list[dict]:
    """The ``configs`` of a results file with ``run`` moved to ``config``'s entry (made if new); an
    entry left without runs is dropped. A file of an older layout (one ``config``) has none."""
    entries = results.get("configs", []) if isinstance(results, dict) else []
    entries = [{**e, "runs": [r for r in e["runs"] if r != run]} for e in entries]
    entries = [e for e in entries if e["runs"]]
    same = next((e for e in entries if e["config"] == config), None)
    if same is None:
        entries.append({"config": config, "runs": [run]})
    else:
        same["runs"].append(run)
    return entries


def add_intervals(rows: list[dict], examples: dict, resamples: int, seed: int) -> None:
    """Every learned row: ``ci95`` of its NLL minus the best baseline's at the same protocol and keep
    ratio (the best baseline: the lowest NLL among strategies that are not learned, the full context
    excepted), from a paired bootstrap over held-out groups."""
    learned = set(mask_names(learned=True))
    for r in rows:
        if r["protocol"] == "policy_training" or parse_strategy(r["strategy"])[0] not in learned:
            continue
        peers = [
            p
            for p in rows
            if p["protocol"] == r["protocol"]
            and p["keep_ratio"] == r["keep_ratio"]
            and p["strategy"] != "identity"
            and parse_strategy(p["strategy"])[0] not in learned
        ]
        r.pop("ci95", None)
        if not peers:
            continue
        best = min(peers, key=lambda p: p["nll"])
        a = examples.get(r["run"], {}).get(f"{r['strategy']}@{r['keep_ratio']:g}")
        b = examples.get(best["run"], {}).get(f"{best['strategy']}@{best['keep_ratio']:g}")
        if a is None or b is None:
            continue
        diff, lo, hi = paired_bootstrap(a, b, resamples=resamples, seed=seed)
        r.update(best_baseline=best["strategy"], diff_vs_best=diff, ci95=[lo, hi])


# -- the report -----------------------------------------------------------------------------------

COLUMNS = [
    "strategy",
    "keep_ratio",
    "nll",
    "diff_vs_best",
    "ci95",
    "rouge",
    "answer_kept",
    "fact_recall",
    "kept_tokens",
]
COLUMNS_TAIL = ["flops_ratio", "policy_share", "lm_sequences", "epochs"]


def _report(rows: list[dict], config, training: ForgetTrainingConfig, out: Path) -> None:
    """``config``: the experiment's :class:`~.experiment.ForgetExperimentConfig`. report.md (policy training, then a table and a plot per protocol: strategies ranked by target
    NLL per keep ratio, learned policies highlighted with their interval)."""
    learned = set(mask_names(learned=True))
    parts = [
        f"# Input forgetting, fair protocol: {config.task}\n",
        f"Base LM `{config.model}`. **Zero-shot**: every strategy on the frozen base LM (learned policies were trained "
        "on it, the LM never). **Finetuned**: each strategy on an LM finetuned on its own keep sets, every LM on the "
        f"same rows for the same epochs (`lm_sequences`); learned policies frozen meanwhile. LM learning rate "
        f"{training.lm_learning_rate:g}, batch {training.per_device_batch_size}, seed {training.seed}. `ci95`: paired "
        "bootstrap over held-out groups of a learned row's NLL minus the best baseline's (`diff_vs_best`); negative "
        "is better. `policy_share`: the policy's time over the LM forward it serves.\n",
    ]
    trained = [r for r in rows if r["protocol"] == "policy_training"]
    if trained:
        parts += [
            "## Policy training\n",
            "Validation NLL (training rows held out of policy training) of the untrained prior, after the warm start, "
            "and the best REINFORCE step; `chosen` is the one kept.\n",
            markdown_table(
                sorted(trained, key=lambda r: -r["keep_ratio"]),
                [
                    "strategy",
                    "keep_ratio",
                    "prior",
                    "val_nll_prior",
                    "val_nll_warm_start",
                    "val_nll_best",
                    "chosen",
                    "policy_steps",
                    "num_samples",
                    "seconds_reinforce",
                ],
            ),
        ]
        parts += [
            f"![training at keep {r['keep_ratio']:g}](policies/{r['strategy'].split('@')[0]}_{r['keep_ratio']:g}/training.png)\n"
            for r in trained
        ]
    for protocol in ("zero_shot", "finetuned"):
        picked = sorted((r for r in rows if r["protocol"] == protocol), key=lambda r: (-r["keep_ratio"], r["nll"]))
        if not picked:
            continue
        shown = [c for c in COLUMNS + COLUMNS_TAIL if any(r.get(c) is not None for r in picked)]
        parts += [f"## {protocol.replace('_', ' ')}\n", markdown_table(picked, shown)]
        panels = {}
        for keep in sorted({r["keep_ratio"] for r in picked}, reverse=True):
            bars = [
                {
                    "label": r["strategy"],
                    "value": r["nll"],
                    "highlight": parse_strategy(r["strategy"])[0] in learned,
                    "interval": None,
                }
                for r in picked
                if r["keep_ratio"] == keep and r["strategy"] not in ("identity", "none")
            ]
            panels[f"keep {keep:g}"] = bars
        references = {
            label: next(r["nll"] for r in picked if r["strategy"] == name)
            for label, name in (("full context", "identity"),)
            if any(r["strategy"] == name for r in picked)
        }
        if any(panels.values()):
            plot_ranked_bars(
                panels,
                out / f"nll_{protocol}.png",
                xlabel="target NLL (nats per token)",
                title=f"{config.task}: {protocol.replace('_', ' ')} (orange: learned)",
                levels=references,
            )
            parts.append(f"![{protocol}](nll_{protocol}.png)\n")
    parts.append(f"\nConfig: `{asdict(config)}`\n")
    write_text("\n".join(parts), out / "report.md")
