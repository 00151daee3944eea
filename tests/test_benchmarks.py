"""The GPU benchmarks run end to end on the CPU at toy sizes and write the JSON their results files
promise (the numbers themselves mean nothing here: speed is measured on a GPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, timeout: int = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCH.parent / "src")}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=BENCH,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_bench_forgetting(tmp_path):
    out = tmp_path / "f.json"
    _run(
        "bench_forgetting.py",
        "--arch",
        "llama-tiny",
        "--lengths",
        "48",
        "--keeps",
        "0.5",
        "--batch",
        "2",
        "--rounds",
        "2",
        "--repeats",
        "1",
        "--modes",
        "eager",
        "--profile",
        "--out",
        str(out),
    )
    res = json.loads(out.read_text())
    assert res["env"]["command"].startswith("bench_forgetting.py") and res["config"]["arch"] == "llama-tiny"
    (row,) = res["rows"]
    assert (row["n"], row["keep"], row["kept_length"], row["full_length"]) == (48, 0.5, 24 + 32, 48 + 32)
    for key in (
        "train_ms",
        "eval_ms",
        "train_share_of_ceiling",
        "eval_share_of_ceiling",
        "eval_mask_ms",
        "eval_policy_ms",
        "eval_gather_ms",
        "eval_lm_ms",
        "train_speedup",
    ):
        assert _finite(row[key]["median"]) and row[key]["min"] <= row[key]["median"] <= row[key]["max"], key
    prof = res["profiles"]["eager"]
    assert prof["pipeline_eval"]["host_syncs"] < prof["pipeline_mask_eval"]["host_syncs"]


def test_tofu_open_unlearning_check(tiny_model_dir, tmp_path):
    """Two evaluations in open-unlearning's layout compared number by number: identical runs
    differ by nothing, and a changed value shows in its aggregate."""
    from forgetful.cli import main

    runs = {}
    for name, extra in (("model", []), ("retain", [])):
        out = tmp_path / name
        argv = ["eval-tofu", "--model", str(tiny_model_dir), "--out", str(out), "--num-authors", "4"]
        assert main(argv + ["--max-examples", "3", "--max-new-tokens", "3", "--open-unlearning-files", *extra]) == 0
        runs[name] = out
    other = tmp_path / "other"
    other.mkdir()
    ev = json.loads((runs["model"] / "TOFU_EVAL.json").read_text())
    ev["forget_Q_A_Prob"]["agg_value"] += 0.5
    (other / "TOFU_EVAL.json").write_text(json.dumps(ev))
    record = tmp_path / "check.json"
    for case, theirs in (("same", runs["model"]), ("changed", other)):
        _run(
            "tofu_open_unlearning_check.py",
            *("--case", case, "--ours", str(runs["model"]), "--theirs", str(theirs)),
            *("--ours-retain", str(runs["retain"]), "--theirs-retain", str(runs["retain"]), "--out", str(record)),
        )
    cases = json.loads(record.read_text())["cases"]
    assert cases["same"]["all_aggregates_max_abs_diff"] == 0.0
    assert cases["same"]["generations"]["forget_Q_A_ROUGE"]["identical_generations"] == "3/3"
    assert cases["changed"]["aggregates"]["forget_Q_A_Prob"]["abs_diff"] == pytest.approx(0.5)
    fq = cases["same"]["forget_quality_from_per_example_truth_ratios"]
    assert fq["forgetful (its model vs its retain model)"] == pytest.approx(1.0)
