"""benchmarks/rmu_activation_norms.py end to end on the tiny model and the embedded data: its JSON
(env, config, one row per layer) and its mean norm equal to adaptive RMU's own measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgetful.loss.tasks import prepare_dataset_for_training
from forgetful.loss.unlearn.rmu import mean_activation_norm
from forgetful.models import load_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_norm_script_measures_what_adaptive_rmu_measures(tiny_model_dir, tmp_path):
    out = tmp_path / "norms.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCH.parent / "src")}
    argv = [
        sys.executable,
        str(BENCH / "rmu_activation_norms.py"),
        "--model",
        str(tiny_model_dir),
        "--data",
        "embedded",
    ]
    argv += ["--num-authors", "10", "--layers", "0,1", "--batch-size", "4", "--machine", "test box", "--out", str(out)]
    proc = subprocess.run(argv, cwd=BENCH, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["env"]["machine"] == "test box" and res["env"]["git_commit"] and res["env"]["torch"] == torch.__version__
    model, tok = load_model(str(tiny_model_dir), dtype=torch.float32)
    rows = prepare_dataset_for_training("tofu", tok, split="forget10", num_authors=10)
    assert (res["config"]["rows"], res["config"]["answer_tokens"]) == (
        len(rows),
        sum(sum(m) for m in rows["loss_mask"]),
    )
    assert [r["layer"] for r in res["rows"]] == [0, 1]
    for row in res["rows"]:
        expected = mean_activation_norm(model, rows, row["layer"], pad_id=tok.pad_token_id, batch_size=8)
        assert row["mean_norm"] == pytest.approx(expected, rel=1e-5) and row["tokens"] == res["config"]["answer_tokens"]
        q = row["token_norm_percentiles"]
        assert q["5"] <= q["25"] <= q["50"] <= q["75"] <= q["95"] and row["rmu_forget_loss_at_coeff_2"] > 0
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(
            [*argv[:-2], "--layers", "5", "--out", str(out)], env=env, cwd=BENCH, check=True, capture_output=True
        )
