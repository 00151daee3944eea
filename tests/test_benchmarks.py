"""The GPU benchmarks run end to end on the CPU at toy sizes and write the JSON their results files
promise (the numbers themselves mean nothing here: speed is measured on a GPU)."""

from __future__ import annotations

import hashlib
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
        *("--arch", "llama-tiny", "--lengths", "48", "--keeps", "0.5,0.25", "--batch", "2", "--rounds", "2"),
        *("--repeats", "1", "--modes", "eager", "--profile", "--out", str(out)),
    )
    res = json.loads(out.read_text())
    assert res["env"]["command"].startswith("bench_forgetting.py") and res["config"]["arch"] == "llama-tiny"
    assert res["complete"] is True and "stopped" not in res and res["env"]["git_commit"]
    row, quarter = res["rows"]
    assert (row["n"], row["keep"], row["kept_length"], row["full_length"]) == (48, 0.5, 24 + 32, 48 + 32)
    assert quarter["keep"] == 0.25 and row["rounds_done"] == quarter["rounds_done"] == 2
    # the same full-length measurement, the ceiling of each keep measured in the same rounds
    assert row["train_full_ms"] == quarter["train_full_ms"] and row["train_ceiling_ms"] != quarter["train_ceiling_ms"]
    for key in (
        "train_ms",
        "eval_ms",
        "train_ceiling_ms",
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


def test_bench_forgetting_stops_at_its_time_limit_and_keeps_the_rounds_done(tmp_path):
    out = tmp_path / "f.json"
    _run(
        "bench_forgetting.py",
        *("--arch", "llama-tiny", "--lengths", "32", "--keeps", "0.5", "--batch", "2", "--rounds", "100000"),
        # 6 s: the tiny model's build and warm-up must fit before the limit on a loaded 2-core machine
        *("--repeats", "1", "--modes", "eager,compile", "--time-limit", "6", "--out", str(out)),
    )
    res = json.loads(out.read_text())
    (row,) = res["rows"]  # the compile mode never started
    assert res["stopped"].startswith("time limit 6 s") and 1 <= row["rounds_done"] < 100000
    assert row["mode"] == "eager" and _finite(row["train_share_of_ceiling"]["median"])


SELECTIVE_METHODS = (
    "hf_plain",
    "liger_all",
    "cce_all",
    "cce_gathered",
    "forgetful_dense",
    "forgetful_chunked",
    "forgetful_cce",
    "forgetful_liger",
    "forgetful_auto",
)


def test_bench_selective(tmp_path):
    """Every method gets a row: the CPU ones are timed, measured and checked against the fp32 dense
    reference gradients (dense is that computation on the CPU: exactly 1.0); the GPU-only ones are
    skipped with the reason."""
    out = tmp_path / "s.json"
    _run(
        "bench_selective.py",
        *("--models", "llama-tiny:2x24,gpt2-tiny:2x16", "--densities", "1.0,0.1"),
        *("--rounds", "2", "--repeats", "1", "--out", str(out)),
    )
    res = json.loads(out.read_text())
    assert res["env"]["command"].startswith("bench_selective.py") and res["config"]["rounds"] == 2
    assert res["complete"] is True and "stopped" not in res
    rows = {(r["model"], r["density"], r["method"]): r for r in res["rows"]}
    models = ("llama-tiny", "gpt2-tiny")
    assert set(rows) == {(m, d, x) for m in models for d in (1.0, 0.1) for x in SELECTIVE_METHODS}
    for (model, density, method), row in rows.items():
        assert row["weights"] == "random"
        if method in ("liger_all", "cce_all", "cce_gathered", "forgetful_cce", "forgetful_liger"):
            assert "CUDA" in row["skipped"] and "ms" not in row, row
            continue
        assert "error" not in row and "skipped" not in row, row
        assert _finite(row["ms"]) and row["ms_spread"]["min"] <= row["ms_spread"]["median"] <= row["ms_spread"]["max"]
        assert _finite(row["peak_gib"]) and row["peak_gib"] > 0 and row["rounds_done"] == 2
        assert row["loss_rel_diff"] < 1e-5 and row["grad_cosine"] >= 0.9999, row
        assert row["grad_cosine"] == min(row["grad_cosine_hidden"], row["grad_cosine_head"])
        if method != "forgetful_dense":
            assert row["ms_vs_forgetful_dense"] == row["ms"] / rows[(model, density, "forgetful_dense")]["ms"]
    for m in models:
        for d in (1.0, 0.1):
            assert rows[(m, d, "forgetful_dense")]["grad_cosine"] == 1.0
            assert rows[(m, d, "forgetful_auto")]["auto_resolves_to"] == "chunked"
    dense = rows[("llama-tiny", 0.1, "forgetful_dense")]
    assert dense["scored_tokens"] < rows[("llama-tiny", 1.0, "forgetful_dense")]["scored_tokens"]


def test_bench_selective_on_the_real_model(tmp_path):
    """``LABEL=NAME``: the built-in SmolLM2 through load_model (real weights), its rows so labelled."""
    out = tmp_path / "s.json"
    _run(
        "bench_selective.py",
        *("--models", "smollm2=smollm2-135m:1x16", "--densities", "0.5", "--rounds", "1", "--repeats", "1"),
        *("--methods", "forgetful_dense,forgetful_chunked", "--out", str(out)),
    )
    res = json.loads(out.read_text())
    dense, chunked = res["rows"]
    assert (dense["model"], dense["weights"], dense["vocab"]) == ("smollm2", "real", 49152)
    assert dense["grad_cosine"] == 1.0 and chunked["grad_cosine"] >= 0.9999 and chunked["loss_rel_diff"] < 1e-5


def test_bench_selective_cpu_memory(tmp_path):
    out = tmp_path / "m.json"
    _run(
        "bench_selective.py",
        "--cpu-memory",
        "--vocab",
        "4096",
        "--cpu-batch",
        "2",
        "--cpu-seq",
        "128",
        "--repeats",
        "1",
        "--out",
        str(out),
    )
    res = json.loads(out.read_text())
    dense, chunked = res["rows"]
    assert (dense["method"], chunked["method"]) == ("forgetful_dense", "forgetful_chunked")
    assert res["chunked_over_dense_peak"] == chunked["peak_mb"] / dense["peak_mb"]
    assert chunked["loss_rel_diff"] < 1e-6 and chunked["grad_cosine"] > 0.99999 and dense["grad_cosine"] == 1.0


def test_ddp_summary_scaling_and_communication_share(tmp_path):
    def run(trainer, n, tokens, profile=None):
        reps = [{"rows_per_s": t / 100, "tokens_per_s": t, "step_s": 1.0, "losses": [2.0, 1.5]} for t in tokens]
        out = {
            "trainer": trainer,
            "processes": n,
            "repetitions": reps,
            "per_device_batch": 4,
            "config": {},
            "profile": profile,
            "tokens_per_s": tokens[-1],
            "rows_per_s": 1,
            "step_s": 1,
            "losses": [2.0],
        }
        (tmp_path / f"{trainer}_{n}.json").write_text(json.dumps(out))

    run("selective", 1, [100.0, 110.0, 90.0])
    run(
        "selective",
        2,
        [190.0, 200.0, 180.0],
        profile=[{"op": "ncclDevKernel_AllReduce", "calls": 1, "ms": 3.0}, {"op": "aten::mm", "calls": 9, "ms": 7.0}],
    )
    _run("ddp_summary.py", str(tmp_path), "--out", str(tmp_path / "summary.json"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["scaling"]["selective"] == {**summary["scaling"]["selective"], "median": 1.9, "min": 1.8, "max": 2.0}
    assert len(summary["rows"]) == 6 and {r["repetition"] for r in summary["rows"]} == {1, 2, 3}
    assert summary["profiles"]["selective_2"]["communication_share_of_top_ops"] == pytest.approx(0.3)
    assert summary["losses_side_by_side"]["selective"] == {"1_gpu": [2.0, 1.5], "2_gpu": [2.0, 1.5]}


def test_bench_masks(tmp_path):
    out = tmp_path / "m.json"
    _run(
        "bench_masks.py",
        *("--arch", "llama-tiny", "--n", "32", "--batch", "2", "--rounds", "2", "--repeats", "1", "--out", str(out)),
    )
    res = json.loads(out.read_text())
    assert res["complete"] is True and res["rounds_done"] == 2 and res["env"]["command"].startswith("bench_masks.py")
    assert (res["full_length"], res["kept_length"]) == (32 + 32, 16 + 32)
    assert res["lm_step_ms"]["min"] <= res["lm_step_ms"]["median"] <= res["lm_step_ms"]["max"]
    rows = {r["policy"]: r for r in res["rows"]}
    assert set(rows) == {"mlp", "cnn_mlp", "rnn", "birnn", "hidden_state", "residual", "attention_score"}
    assert rows["attention_score"]["learned"] is False and rows["attention_score"]["policy_train_ms"] is None
    for row in rows.values():
        assert _finite(row["share_of_lm_step"]["median"]) and row["flops_per_token"] > 0
        assert row["share_of_kept_lm_step"]["min"] <= row["share_of_kept_lm_step"]["max"]
        if row["learned"]:
            assert _finite(row["train_share_of_lm_step"]["median"]) and row["rounds_done"] == 2
    assert rows["hidden_state"]["flops_per_token"] > rows["mlp"]["flops_per_token"]


def test_tofu_open_unlearning_check(tiny_model_dir, tmp_path):
    """Two evaluations in open-unlearning's layout compared number by number: identical runs
    differ by nothing, and a changed value shows in its aggregate."""
    from forgetful.cli import main

    runs = {}
    for name in ("model", "retain"):  # the same checkpoint twice: the check is about the comparison script
        out = tmp_path / name
        argv = ["eval-tofu", "--model", str(tiny_model_dir), "--out", str(out), "--num-authors", "4"]
        assert main(argv + ["--max-examples", "3", "--max-new-tokens", "3", "--open-unlearning-files"]) == 0
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


def test_gpu_session_refuses_an_unknown_ddp_run(tmp_path):
    """A typo in DDP_RUNS stops the phase with one line before any launch, instead of running nothing."""
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "DDP_RUNS": "selective_ddp bogus",
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_session.sh"), "ddp"], cwd=BENCH.parent, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stdout.strip() == "DDP_RUNS: unknown run bogus"
    assert not list((tmp_path / "out" / "ddp").iterdir())  # nothing was launched


TINY = {
    "bench_forgetting": "--arch llama-tiny --lengths 32 --keeps 0.5 --batch 2 --rounds 1 --repeats 1 --modes eager",
    "bench_selective": "--models llama-tiny:2x16 --densities 1.0 --rounds 1 --repeats 1",
    "bench_masks": "--arch llama-tiny --n 32 --batch 2 --rounds 1 --repeats 1 --policies mlp",
}
OUTPUTS = {
    "bench_forgetting": "bench_forgetting_smollm2_h200.json",
    "bench_selective": "selective_backends.json",
    "bench_masks": "bench_masks_smollm2_h200.json",
}


@pytest.mark.parametrize("phase", sorted(TINY))
def test_gpu_session_bench_phases_run_with_their_time_limit(phase, tmp_path):
    """Each benchmark phase's own options parse and its JSON lands in $OUT under the name the results
    will have, run with the phase's time limit (tiny sizes appended through BENCH_EXTRA)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (shim / "python3").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shim}:{os.environ['PATH']}",
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "OMP_NUM_THREADS": "1",
        "BENCH_EXTRA": TINY[phase],
        "BENCH_LIMIT": "300",
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_session.sh"), phase], cwd=BENCH.parent, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and f"{phase} exit 0" in proc.stdout, proc.stdout[-2000:]
    res = json.loads((tmp_path / "out" / OUTPUTS[phase]).read_text())
    assert res["complete"] is True and res["config"]["time_limit"] == 300 and res["rows"]


def test_gpu_session_joins_the_gguf_parts_carried_over_three_calls(tmp_path):
    """The model file travels in three parts, one per call: `setup`, `part` and `model` each keep the part
    their call carried, `model` joins them in order and checks the sha256; a missing part fails the check."""
    blob = bytes(range(256)) * 41  # 10,496 bytes, split like the real file
    parts = [blob[:4000], blob[4000:8000], blob[8000:]]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    env["GGUF_SHA256"] = hashlib.sha256(blob).hexdigest()
    script = str(BENCH / "gpu_session.sh")
    for i, phase in enumerate(["part", "part", "model"]):
        call = tmp_path / f"call{i}"  # each call's copy of the checkout carries one part
        (call / ".gguf_parts").mkdir(parents=True)
        (call / ".gguf_parts" / f"smollm2.gguf.parta{'abc'[i]}").write_bytes(parts[i])
        proc = subprocess.run(["bash", script, phase], cwd=call, env=env, capture_output=True, text=True)
    # the last call joined the three parts and the checksum held (loading the made-up file then fails)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf: OK" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "work" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == blob
    (tmp_path / "work" / "models" / "smollm2.gguf.partab").unlink()
    proc = subprocess.run(["bash", script, "model"], cwd=tmp_path / "call0", env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "FAILED" in proc.stdout


def _recording_python(tmp_path):
    """A stand-in python3 that records its arguments, one call a line, and writes a results file
    into the folder after ``--out``."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{tmp_path}/calls"\n'
        'while [ $# -gt 0 ]; do case "$1" in --out) out=$2;; esac; shift; done\n'
        'mkdir -p "$out"; echo {} > "$out/results.json"\n'
    )
    (shim / "python3").chmod(0o755)
    return shim


@pytest.mark.parametrize("phase", ["tofu", "forget"])
def test_gpu_session_phases_are_one_budgeted_call_each(phase, tmp_path):
    """The tofu phase is one tofu-experiment call, the forget phase one forget-experiment call per task and
    keep ratio, each given the phase's BUDGET as its --time-budget (the experiments decide which runs fit;
    the script holds no list of runs or methods), and the results come back packed."""
    shim = _recording_python(tmp_path)
    env = {
        **os.environ,
        "PATH": f"{shim}:{os.environ['PATH']}",
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "BUDGET": "123",
        "FORGET_TASKS": "text multihop",
        "KEEPS": "0.25 0.125",
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_session.sh"), phase], cwd=BENCH.parent, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    command = "tofu-experiment" if phase == "tofu" else "forget-experiment"
    assert len(calls) == (1 if phase == "tofu" else 4) and all(command in c for c in calls)
    assert all("--time-budget 123" in c for c in calls)
    if phase == "forget":
        assert sorted(c.split("--keep ")[1].split()[0] + c.split("--task ")[1].split()[0] for c in calls) == [
            "0.125multihop", "0.125text", "0.25multihop", "0.25text"
        ]  # fmt: skip
    packs = ["tofu_real.tgz"] if phase == "tofu" else ["forget_multihop.tgz", "forget_text.tgz"]
    assert all((tmp_path / "out" / name).is_file() for name in packs)


def test_tofu_seeds_summary_over_seed_folders(tmp_path):
    """Per run and seed the figures of each results.json, then mean / min / max over seeds, for the
    runs every folder has; two folders of one seed are refused."""

    def experiment(name, seed, rows):
        folder = tmp_path / name
        folder.mkdir()
        runs = [
            {"run": r, "forget_quality": fq, "model_utility": mu, "utility_vs_full": ratio} for r, fq, mu, ratio in rows
        ]
        (folder / "results.json").write_text(json.dumps({"training_args": {"seed": seed}, "runs": runs}))
        return str(folder)

    a = experiment(
        "s0", 0, [("full", 1e-16, 0.36, 1.0), ("full_forget_answers", 1.0, 0.33, 0.93), ("full_npo", 1e-9, 0.3, 0.84)]
    )
    b = experiment("s1", 1, [("full", 2e-16, 0.35, 1.0), ("full_forget_answers", 0.9, 0.34, 0.97)])
    _run("tofu_seeds.py", a, b, "--out", str(tmp_path / "seeds.json"))
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and list(summary["runs"]) == ["full", "full_forget_answers"]  # npo: one seed only
    answers = summary["runs"]["full_forget_answers"]
    assert answers["per_seed"]["1"] == {"forget_quality": 0.9, "model_utility": 0.34, "utility_vs_full": 0.97}
    assert answers["utility_vs_full"] == {"mean": pytest.approx(0.95), "min": 0.93, "max": 0.97}
    assert answers["forget_quality"]["min"] == 0.9
    assert (
        "| full_forget_answers | 1.0000 | 0.9000 | 0.3300 | 0.3400 | 0.9300 | 0.9700 | 0.9500 [0.9300, 0.9700] |"
        in (tmp_path / "seeds.md").read_text()
    )
    again = experiment("s0_again", 0, [("full", 1e-16, 0.36, 1.0)])
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src")}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "tofu_seeds.py"), a, again, "--out", str(tmp_path / "x.json")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0 and "two folders were trained with the same seed: [0, 0]" in proc.stderr
