"""The shell entry points: scripts/train_hf.sh trains a TOFU model, scripts/eval_hf.sh scores it
(extra options pass through to the CLI in both)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _sh(args: list[str], env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src"), **env}
    return subprocess.run(["bash", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)


def test_train_then_eval_scripts(tiny_model_dir, tmp_path):
    from forgetful.cli import main

    data = tmp_path / "tofu"
    assert (
        main(
            [
                "generate-data",
                "--out",
                str(tmp_path / "gen"),
                "--tofu_authors",
                "10",
                "--corpus_docs",
                "10",
                "--forget_examples",
                "4",
                "--eval_examples",
                "4",
            ]
        )
        == 0
    )
    (tmp_path / "gen" / "tofu").rename(data)
    model = tmp_path / "model"
    proc = _sh(
        [str(ROOT / "scripts" / "train_hf.sh"), "forget_facts", "full", "--max_steps", "2"],
        {"MODEL": str(tiny_model_dir), "DATA": str(data), "OUT": str(model), "BATCH": "4"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((model / "results.json").read_text())
    assert results["steps"] == 2 and results["task_options"]["strategy"] == "forget_facts"
    proc = _sh(
        [str(ROOT / "scripts" / "eval_hf.sh"), str(model), "", "--max-examples", "3"],
        {"DATA": str(data), "MAX_NEW_TOKENS": "8", "BATCH": "8"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((model / "eval" / "tofu_summary.json").read_text())
    assert 0.0 <= summary["model_utility"] <= 1.0
    evaluated = json.loads((model / "eval" / "tofu_eval.json").read_text())
    assert evaluated["meta"]["max_new_tokens"] == 8  # from the environment
    for name in ("forget", "retain", "real_authors", "world_facts"):
        assert len(evaluated[name]["question"]) == 3  # --max-examples 3, passed through
