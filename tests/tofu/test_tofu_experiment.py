"""The TOFU experiment (forgetful.tofu.experiment) end to end on the CPU at toy size: embedded data,
a tiny model, a few steps; every run (retain, full, masked, unlearned) written as it finishes,
--only to split the work, the results, per-example files, report and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_tofu_config

from forgetful.errors import ForgetfulError
from forgetful.tofu.experiment import TofuExperimentConfig, TofuTrainingArguments, run_tofu_experiment, unlearning_args
from forgetful.tofu.grid import plan_runs
from forgetful.tofu.metrics import (
    UTILITY_SETS,
    bootstrap_model_utility,
    forget_quality,
    percentile_interval,
    utility_contributions,
)
from forgetful.tofu.rows import add_utility_intervals

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ROW_KEYS = {"run", "forget_quality", "model_utility", "privleak", "forget_rouge", "forget_truth_ratio"}
ROW_KEYS |= {f"{s}_{m}" for s in ("retain", "real_authors", "world_facts") for m in ("prob", "rouge", "truth_ratio")}


def _config(model_dir, out, **kw) -> TofuExperimentConfig:
    return tiny_tofu_config(model_dir, out, **{"unlearning": "grad_diff,npo,simnpo,rmu", "unlearn_epochs": 1.0, **kw})


def _training(**kw) -> TofuTrainingArguments:
    base = dict(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, disable_tqdm=True)
    base.update(kw)
    return TofuTrainingArguments(**base)


def test_plan_runs_and_its_errors(tmp_path):
    runs = plan_runs(_config("m", tmp_path))
    assert TofuExperimentConfig.unlearning == "grad_diff,npo,simnpo,rmu"  # the default: four methods
    assert [r.name for r in runs] == [
        "retain",
        "full",
        "full_forget_answers",
        "full_forget_facts",
        "full_goldfish",
        "full_grad_diff",
        "full_npo",
        "full_simnpo",
        "full_rmu",
    ]
    assert runs[0].split == "retain90" and runs[-1].kind == "unlearn" and runs[-1].split == "forget10"
    with pytest.raises(ForgetfulError, match="unknown unlearning method 'dpo'; choose from .*, simnpo, rmu"):
        plan_runs(_config("m", tmp_path, unlearning="npo,dpo"))
    with pytest.raises(ForgetfulError, match="unknown masking strategies forget_all"):
        plan_runs(_config("m", tmp_path, strategies="forget_all"))
    # a loss option one of the methods cannot take is refused when the experiment is configured, before any training
    with pytest.raises(
        ForgetfulError, match="unlearning method 'grad_diff' takes retain_loss_type NLL, KL, got 'EMBED"
    ):
        _config("m", tmp_path, retain_loss_type="EMBED_DIFF")
    assert _config("m", tmp_path, unlearning="rmu", retain_loss_type="EMBED_DIFF").retain_loss_type == "EMBED_DIFF"


def test_each_unlearning_run_takes_its_methods_defaults(tmp_path):
    """One experiment config, four methods: options left unset take each method's own default, a
    value given applies to every method that reads it."""
    a, training = _config("m", tmp_path), _training(use_cpu=True)

    def loss_options(method, config=a):
        u = unlearning_args(config, training, method, str(tmp_path / method))
        return u.beta, u.gamma, u.alpha, u.retain_loss_type

    assert loss_options("grad_diff") == (0.1, 1.0, 1.0, "NLL")
    assert loss_options("npo") == (0.1, 1.0, 1.0, "NLL")
    assert loss_options("simnpo") == (4.5, 0.125, 1.0, "NLL")
    assert loss_options("rmu")[1:] == (1.0, 1.0, "EMBED_DIFF")
    given = _config("m", tmp_path, beta=0.5, retain_loss_type="KL")
    assert loss_options("npo", given)[::3] == loss_options("simnpo", given)[::3] == (0.5, "KL")
    rmu = unlearning_args(a, training, "rmu", str(tmp_path / "rmu"))
    assert (rmu.steering_coeff, rmu.rmu_layer, rmu.rmu_params) == (2.0, None, "wmdp")  # WMDP's down_proj
    # a grid point's values win over the experiment's, for that run only
    point = unlearning_args(a, training, "rmu", "x", {"learning_rate": 3e-5, "rmu_params": ".*", "rmu_layer": 0})
    assert (point.learning_rate, point.rmu_params, point.rmu_layer, point.steering_coeff) == (3e-5, ".*", 0, 2.0)
    assert unlearning_args(a, training, "rmu", "x").learning_rate == a.unlearn_learning_rate == 1e-3
    assert unlearning_args(_config("m", tmp_path), _training(loss_backend="dense"), "npo", "x").loss_backend == "dense"


def test_experiment_end_to_end_in_parts(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETFUL_COMMIT", "c0ffee1")
    out = tmp_path / "exp"
    # unlearning needs the full model first
    with pytest.raises(ForgetfulError, match="run full_npo unlearns from the full run's model.*--only full"):
        run_tofu_experiment(_config(tiny_model_dir, out, only="full_npo"), _training())
    # part 1: the reference and the full model
    res = run_tofu_experiment(_config(tiny_model_dir, out, only="retain,full"), _training())
    assert [r["run"] for r in res["runs"]] == ["retain", "full"]
    assert (out / "full" / "model" / "results.json").is_file() and (out / "retain" / "run.json").is_file()
    assert set(res["missing_runs"]) == {"full_forget_answers", "full_forget_facts", "full_goldfish"} | {
        "full_grad_diff",
        "full_npo",
        "full_simnpo",
        "full_rmu",
    }
    # part 2: the rest (retain and full are reused)
    res = run_tofu_experiment(_config(tiny_model_dir, out), _training())
    assert res["missing_runs"] == []
    results = json.loads((out / "results.json").read_text())
    rows = {r["run"]: r for r in results["runs"]}
    assert set(rows) == {r.name for r in plan_runs(_config(tiny_model_dir, out))}
    for name, row in rows.items():
        assert set(row) >= ROW_KEYS, name
        per = json.loads((out / name / "forget_per_example.json").read_text())
        assert len(per["forget"]["truth_ratio"]) == 4 and len(per["holdout"]["min_k"]) == 4
        # forget quality is recomputable from the per-example files
        retain = json.loads((out / "retain" / "forget_per_example.json").read_text())
        assert row["forget_quality"] == pytest.approx(
            forget_quality(per["forget"]["truth_ratio"], retain["forget"]["truth_ratio"])
        )
        # so is model utility, and its interval holds it
        utility = json.loads((out / name / "utility_per_example.json").read_text())
        nine = np.concatenate([utility_contributions(utility)[s].mean(0) for s in UTILITY_SETS])
        assert row["model_utility"] == pytest.approx(0.0 if nine.min() <= 0 else 9 / np.sum(1 / nine)), name
        low, high = row["model_utility_ci"]
        assert low <= row["model_utility"] <= high, name
        if rows["full"]["model_utility"] > 0:
            assert row["utility_vs_full"] == pytest.approx(row["model_utility"] / rows["full"]["model_utility"])
    assert rows["retain"]["forget_quality"] == pytest.approx(1.0) and rows["retain"]["privleak"] == pytest.approx(0.0)
    assert (
        rows["full_npo"]["kind"] == "unlearn"
        and rows["full_npo"]["forget_prob_after"] < rows["full_npo"]["forget_prob_before"]
    )
    # the recipes are recorded
    ft, un = results["recipe"]["finetune"], results["recipe"]["unlearn"]
    for recipe in (ft, un):
        assert {
            "learning_rate",
            "num_train_epochs",
            "effective_batch_size",
            "weight_decay",
            "warmup_epochs",
            "optim",
        } <= set(recipe)
    assert (ft["learning_rate"], ft["effective_batch_size"], ft["warmup_epochs"]) == (1e-5, 8, 1.0)
    # the tiny model is no built-in small model: auto picks open-unlearning's recipe; the batch is the caller's
    assert (ft["name"], ft["asked"]) == ("open_unlearning", "auto")
    assert ft["overridden"] == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    # where it ran, for the results and for each run
    import torch

    env = results["env"]
    assert (env["device"], env["torch"], env["git_commit"]) == ("cpu", torch.__version__, "c0ffee1")
    assert {"transformers", "accelerate", "cpu"} <= set(env)
    for name, row in rows.items():
        assert row["env"]["git_commit"] == "c0ffee1" and row["env"]["device"] == "cpu", name
        assert row["lr"] == (1e-3 if row["kind"] == "unlearn" else 1e-5), name
        assert row["steps"] > 0 and 0 < row["epochs"] <= 1.0 and row["effective_batch_size"] == 8, name
        assert row["seconds"] == pytest.approx(row["train_seconds"] + row["eval_seconds"], abs=0.15), name
    assert rows["full"]["steps"] == 2 and rows["full_npo"]["epochs"] == 1.0
    # the shared unlearning recipe holds no method's option; each unlearning row holds its method's own
    assert (un["learning_rate"], un["num_train_epochs"]) == (1e-3, 1.0) and not {"beta", "gamma", "method"} & set(un)
    assert rows["full_npo"]["loss_options"] == {"alpha": 1.0, "gamma": 1.0, "retain_loss_type": "NLL", "beta": 0.1}
    assert rows["full_simnpo"]["loss_options"] == {
        "alpha": 1.0,
        "gamma": 0.125,
        "retain_loss_type": "NLL",
        "beta": 4.5,
        "delta": 0.0,
    }
    assert rows["full_rmu"]["loss_options"]["retain_loss_type"] == "EMBED_DIFF"
    report = (out / "report.md").read_text()
    assert "| full_npo | unlearn | npo |" in report
    assert "- `npo`: alpha 1, gamma 1, retain_loss_type NLL, beta 0.1" in report
    assert "- `simnpo`: alpha 1, gamma 0.125, retain_loss_type NLL, beta 4.5, delta 0" in report
    # what the options resolved to: RMU's layer (the tiny model's last: it has no layer 7), auto's backend on a CPU
    assert rows["full_rmu"]["method_state"]["layer"] == 1 and rows["full_npo"]["loss_backend"] == "chunked"
    # rmu_params wmdp: WMDP's MLP output projections of layers L-2..L, and what the method resolved it to
    down = r"model\.layers\.0\.mlp\.down_proj\.weight|model\.layers\.1\.mlp\.down_proj\.weight"
    assert (
        f"- `rmu`: alpha 1, gamma 1, retain_loss_type EMBED_DIFF, steering_coeff 2, rmu_params wmdp; layer 1, "
        f"rmu_params {down}, " in report
    )
    assert "- `simnpo`: alpha 1, gamma 0.125, retain_loss_type NLL, beta 4.5, delta 0\n" in report
    assert (out / "utility_vs_forget_quality.png").stat().st_size > 1000


def test_utility_intervals_and_the_ratio_to_the_full_run():
    """Rows get model utility's interval and, against a full run of non-zero utility, the ratio with
    its paired interval; runs scored on other numbers of questions are refused with the fix."""
    rng = np.random.default_rng(0)

    def evaluation(scale, sizes=(30, 8, 9)):
        return {
            s: {k: (scale * rng.uniform(0.2, 0.9, n)).tolist() for k in ("prob", "rouge")}
            | {"truth_ratio": rng.uniform(0.1, 0.8, n).tolist()}
            for s, n in zip(UTILITY_SETS, sizes)
        }

    evals = {"full": evaluation(1.0), "retain": evaluation(0.9), "worse": evaluation(0.5)}
    rows = [{"run": r, "model_utility": summarize_utility(e)} for r, e in evals.items()]
    add_utility_intervals(rows, evals, seed=0)
    by = {r["run"]: r for r in rows}
    for row in rows:
        low, high = row["model_utility_ci"]
        assert low < row["model_utility"] < high
        # the interval a run's tofu_summary.json has (summarize: the same resampling, one run alone)
        alone = bootstrap_model_utility({"x": evals[row["run"]]})["x"]
        assert row["model_utility_ci"] == list(percentile_interval(alone))
        assert row["utility_vs_full"] == pytest.approx(row["model_utility"] / by["full"]["model_utility"])
    assert by["full"]["utility_vs_full_ci"] == pytest.approx([1.0, 1.0])
    low, high = by["worse"]["utility_vs_full_ci"]
    assert low < by["worse"]["utility_vs_full"] < high < 1.0
    # without a full run: intervals, no ratio
    rows = [{"run": "retain", "model_utility": by["retain"]["model_utility"]}]
    add_utility_intervals(rows, evals, seed=0)
    assert "model_utility_ci" in rows[0] and "utility_vs_full" not in rows[0]
    evals["short"] = evaluation(1.0, sizes=(30, 8, 5))
    with pytest.raises(ForgetfulError, match="evaluate every run with the same --max-eval-examples"):
        add_utility_intervals([{"run": r, "model_utility": 0.3} for r in evals], evals, seed=0)


def summarize_utility(per_example: dict) -> float:
    nine = np.concatenate([utility_contributions(per_example)[s].mean(0) for s in UTILITY_SETS])
    return float(9 / np.sum(1 / nine))


def test_cli_unlearn_with_evaluation(tiny_model_dir, tmp_path):
    from forgetful.cli import main

    out = tmp_path / "npo"
    argv = ["unlearn", "--model", str(tiny_model_dir), "--out", str(out), "--method", "npo", "--num-authors", "5"]
    argv += ["--max_steps", "2", "--learning_rate", "1e-3", "--evaluate", "--max-eval-examples", "3"]
    argv += ["--max-new-tokens", "3", "--eval-batch-size", "4"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["method"], res["forget_split"], res["retain_split"], res["steps"]) == ("npo", "forget10", "retain90", 2)
    assert res["recipe"]["beta"] == 0.1 and res["effective_batch_size"] == 32
    assert res["forget_prob_after"] < res["forget_prob_before"]
    summary = json.loads((out / "tofu_summary.json").read_text())
    assert {"model_utility", "privleak", "extraction_strength"} <= set(summary)
    assert (out / "config.json").is_file() and (out / "tofu_eval.json").is_file()


def test_cli_recipe_with_a_flag_over_it(tiny_model_dir, tmp_path, capsys):
    """Through the command: the named recipe sets the batch, the learning-rate flag wins over it; a
    later call of another recipe reuses the run and says it was trained otherwise."""
    from forgetful.cli import main

    out = tmp_path / "exp"
    argv = ["tofu-experiment", "--model", str(tiny_model_dir), "--out", str(out), "--num-authors", "5"]
    argv += ["--recipe", "smollm2", "--learning-rate", "1e-5", "--max_steps", "1", "--only", "retain"]
    argv += ["--max-eval-examples", "2", "--max-new-tokens", "2", "--eval-batch-size", "4", "--disable-tqdm", "true"]
    assert main(argv) == 0
    # --disable-tqdm silences the model loader's bars too (transformers' "Loading weights")
    assert "Loading weights" not in capsys.readouterr().err
    row = json.loads((out / "retain" / "run.json").read_text())
    assert (row["lr"], row["effective_batch_size"], row["steps"]) == (1e-5, 32, 1)
    assert main([a for a in argv if a not in ("--learning-rate", "1e-5")]) == 0
    assert f"[retain] note: trained at lr 1e-05, not 0.0001; delete {out / 'retain'}" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["simnpo", "rmu"])
def test_cli_unlearn_simnpo_and_rmu(tiny_model_dir, tmp_path, method):
    """Two steps of each new method through the CLI, with a loss backend asked for; RMU saves its
    control vector beside the model."""
    from safetensors.torch import load_file

    from forgetful.cli import main

    out = tmp_path / method
    argv = ["unlearn", "--model", str(tiny_model_dir), "--out", str(out), "--method", method, "--num-authors", "5"]
    argv += ["--max_steps", "2", "--learning_rate", "1e-3", "--loss_backend", "chunked"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["method"], res["steps"], res["loss_backend"]) == (method, 2, "chunked")
    assert (out / "config.json").is_file()
    recipe = res["recipe"]
    if method == "simnpo":
        assert (recipe["beta"], recipe["gamma"], recipe["delta"], recipe["retain_loss_type"]) == (
            4.5,
            0.125,
            0.0,
            "NLL",
        )
        assert res["method_state"] == {"delta": 0.0}  # the margin it trained with
    else:
        assert (recipe["retain_loss_type"], recipe["steering_coeff"], recipe["rmu_params"]) == (
            "EMBED_DIFF",
            2.0,
            "wmdp",
        )
        assert res["method_state"]["trainable_parameters"] == 2  # WMDP's: the down_proj of layers 0..1
        assert res["method_state"]["layer"] == 1  # the tiny model's last layer (it has no layer 7)
        vector = load_file(out / res["method_state"]["control_vector_file"])["control_vector"]
        assert vector.shape == (32,) and vector.norm().item() == pytest.approx(2.0, rel=1e-5)
