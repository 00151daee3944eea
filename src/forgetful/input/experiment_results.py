"""The forget experiment's folder: ``results.json`` (``env`` and the rows) and ``per_example.json``
written under one file lock (several processes, one per keep ratio, may share a folder), and the
paired comparisons of every learned row (:func:`add_comparisons`), which the report
(:mod:`.experiment_report`) prints.

For a learned row (one policy, learner and seed, at one keep ratio and protocol), each against
the same held-out rows, paired over their groups (:mod:`.stats`: interval and sign-flip p):

* ``vs_matched``: the best **compute-matched** baseline - the lowest NLL among strategies that are
  not learned, whose FLOPs ratio is at most the learned row's (the full context, no context and
  the oracle excepted);
* ``vs_best``: the best baseline whatever its FLOPs;
* ``vs_prior``: the policy's own prior (a residual policy over ``recency`` at sentences: the row
  ``recency@sentence``) - what learning added;
* ``vs_equal_flops``: the ``flops_matched`` strategy at the keep ratio of the same FLOPs;
* ``gap`` (zero-shot): ``(matched - learned) / (matched - oracle)`` on the rows the oracle scored,
  and ``gap_unread`` on the tokens after the target (text), printed where the headroom's interval
  excludes 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import asdict
from pathlib import Path

from ..errors import ForgetfulError
from ..reporting import as_json_values, write_json
from .policies import is_learned, parse_strategy
from .stats import NLL, UNREAD, compare, gap_closed
from .strategy import StrategySpec

REFERENCES = ("identity", "none")


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
    from .experiment_report import write_experiment_report

    with _locked(out):
        _, found = read_results(out)
        found = [r for r in found if r["run"] != run] + rows
        examples = _read_json(out / "per_example.json", {})
        examples[run] = per_example
        add_comparisons(found, examples, config.bootstrap, training.seed)
        write_json(examples, out / "per_example.json")
        config_values = as_json_values({**asdict(config), "training": asdict(training)})
        configs = configs_with(_read_json(out / "results.json", {}), run, config_values)
        write_json({"env": env, "configs": configs, "rows": found}, out / "results.json")
        write_experiment_report(found, config, training, out, configs)
    return found


def rewrite_report(out: Path, config, training) -> list[dict]:
    """The comparisons and ``report.md`` of a folder made again from its ``results.json`` and
    ``per_example.json`` (after a change to how they are computed); nothing is run."""
    from .experiment_report import write_experiment_report

    with _locked(out):
        env, found = read_results(out)
        if not found:
            raise ForgetfulError(f"{out} holds no results to report on")
        examples = _read_json(out / "per_example.json", {})
        add_comparisons(found, examples, config.bootstrap, training.seed)
        configs = _read_json(out / "results.json", {}).get("configs", [])
        write_json({"env": env, "configs": configs, "rows": found}, out / "results.json")
        write_experiment_report(found, config, training, out, configs)
    return found


def configs_with(results, run: str, config: dict) -> list[dict]:
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


# -- comparisons ----------------------------------------------------------------------------------


def example_key(row: dict) -> str:
    """The key of a row's examples in ``per_example.json``: strategy and keep ratio, and for a
    learned policy its learner and seed, for an equal-FLOPs row the policy it matches."""
    key = f"{row['strategy']}@{row['keep_ratio']:g}"
    if row.get("learner"):
        key += f"/{row['learner']}/s{row['seed']}"
    if row.get("flops_matched_for"):
        key += f"=flops/{row['flops_matched_for']}"
    return key


def is_baseline(row: dict) -> bool:
    """A strategy that is not learned, scored at its keep ratio: the peers of learned rows."""
    return (
        row["protocol"] in ("zero_shot", "finetuned")
        and not row.get("reference")
        and not row.get("flops_matched_for")
        and row["strategy"] not in REFERENCES
        and not is_learned(row["strategy"])
    )


def prior_strategy(row: dict) -> str | None:
    """The baseline a residual policy started from, at its unit: ``recency@sentence`` for
    ``residual@sentence`` over recency."""
    prior = row.get("prior")
    if not prior:
        return None
    spec, base = parse_strategy(row["strategy"]), parse_strategy(prior)
    depth = spec.kwargs.get("forget_layer")  # a policy that drops at depth: its prior at the same depth
    options = dict(base.options) | ({"forget_layer": depth} if depth else {})
    return str(StrategySpec(base.name, tuple(sorted(options.items())), spec.unit))


def add_comparisons(rows: list[dict], examples: dict, resamples: int, seed: int) -> None:
    """Every learned row (zero-shot or finetuned): its paired comparisons (see the module
    docstring), written into the row."""
    priors = {
        (r["strategy"], r["learner"], r["seed"], r["keep_ratio"]): r.get("prior")
        for r in rows
        if r["protocol"] == "policy_training"
    }

    def per_example(r):
        return examples.get(r["run"], {}).get(example_key(r))

    for r in rows:
        if r["protocol"] not in ("zero_shot", "finetuned") or not r.get("learner"):
            continue
        for key in ("vs_matched", "vs_best", "vs_prior", "vs_equal_flops", "gap", "gap_unread"):
            r.pop(key, None)
        mine = per_example(r)
        if mine is None:
            continue
        r.setdefault("prior", priors.get((r["strategy"], r["learner"], r["seed"], r["keep_ratio"])))
        peers = [
            p for p in rows if p["protocol"] == r["protocol"] and p["keep_ratio"] == r["keep_ratio"] and is_baseline(p)
        ]
        matched = [p for p in peers if p["flops_ratio"] <= r["flops_ratio"] + 1e-9]
        prior = prior_strategy(r)
        targets = {
            "vs_matched": min(matched, key=lambda p: p["nll"], default=None),
            "vs_best": min(peers, key=lambda p: p["nll"], default=None),
            "vs_prior": next((p for p in peers if p["strategy"] == prior), None),
            "vs_equal_flops": next(
                (
                    p
                    for p in rows
                    if p.get("flops_matched_for") == r.get("label")
                    and p["keep_ratio"] == r["keep_ratio"]
                    and p["run"] == r["run"]
                ),
                None,
            ),
        }
        for key, other in targets.items():
            theirs = per_example(other) if other is not None else None
            if theirs is not None:
                r[key] = {"baseline": other["strategy"], **compare(mine, theirs, resamples=resamples, seed=seed)}
        oracle = next(
            (
                o
                for o in rows
                if o.get("reference") and o["protocol"] == "zero_shot" and o["keep_ratio"] == r["keep_ratio"]
            ),
            None,
        )
        base = targets["vs_matched"]
        if r["protocol"] == "zero_shot" and oracle is not None and base is not None and per_example(oracle) is not None:
            three = [per_example(base), mine, per_example(oracle)]
            for key, keys in (("gap", NLL), ("gap_unread", UNREAD)):
                if all(keys[0] in d for d in three):
                    found = gap_closed(*three, resamples=resamples, seed=seed, keys=keys, rows=oracle["rows"])
                    r[key] = {"baseline": base["strategy"], "oracle_rows": oracle["rows"], **found}
