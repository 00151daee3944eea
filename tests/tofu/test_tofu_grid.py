"""The TOFU experiment over grids, seeds, mask shares and checkpoint epochs (forgetful.tofu.grid,
forgetful.tofu.plane): the grid syntax and its errors, run names, the plan, the time estimate, the
noise floor and best points against hand computations, a checkpoint that is the schedule stopped
at its epoch, and the whole grid end to end on the CPU (the tiny model's utility is 0: no plot is
read from it)."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from conftest import tiny_tofu_config
from transformers import TrainerCallback

from forgetful.errors import ForgetfulError
from forgetful.loss.share_masks import masked_count
from forgetful.loss.tasks import prepare_dataset_for_training
from forgetful.loss.unlearning import UnlearningConfig, UnlearningTrainer
from forgetful.models import load_model
from forgetful.tofu.experiment import TofuExperimentConfig, TofuTrainingArguments, run_tofu_experiment
from forgetful.tofu.grid import DEFAULT_RUN_SECONDS, estimate_seconds, parse_grid, plan_runs, point_of
from forgetful.tofu.metrics import forget_quality
from forgetful.tofu.plane import UTILITY_SHARE, best_points, frontier, noise_floor, seed_spread
from forgetful.tofu.unlearning import TofuUnlearnConfig, unlearn_tofu

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _config(model_dir, out, **kw) -> TofuExperimentConfig:
    return tiny_tofu_config(model_dir, out, **{"unlearning": "grad_diff,rmu", "unlearn_epochs": 2.0, **kw})


def _training(**kw) -> TofuTrainingArguments:
    base = dict(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, disable_tqdm=True)
    return TofuTrainingArguments(**{**base, **kw})


def test_grid_syntax_and_its_errors():
    grid = parse_grid("npo:learning_rate=1e-5|3e-5,beta=0.1|0.5; simnpo:delta=0|fitted,gamma=1", ["npo", "simnpo"])
    assert grid["npo"] == [
        {"learning_rate": 1e-5, "beta": 0.1},
        {"learning_rate": 1e-5, "beta": 0.5},
        {"learning_rate": 3e-5, "beta": 0.1},
        {"learning_rate": 3e-5, "beta": 0.5},
    ]
    assert grid["simnpo"] == [{"delta": "0", "gamma": 1.0}, {"delta": "fitted", "gamma": 1.0}]
    assert parse_grid("rmu:rmu_layer=4|none,rmu_params=wmdp|.*", ["rmu"])["rmu"] == [
        {"rmu_layer": 4, "rmu_params": "wmdp"},
        {"rmu_layer": 4, "rmu_params": ".*"},
        {"rmu_layer": None, "rmu_params": "wmdp"},  # none: unset (layer 7, or the model's last)
        {"rmu_layer": None, "rmu_params": ".*"},
    ]
    assert parse_grid("rmu:steering_scale=none|1", ["rmu"])["rmu"] == [
        {"steering_scale": None},
        {"steering_scale": 1.0},
    ]
    assert parse_grid(None, ["npo"]) == {} == parse_grid("", ["npo"])
    errors = {
        "dpo:beta=1": "unknown unlearning method 'dpo'",
        "npo:beta=1": "'npo' is not among --unlearning .*add it there",
        "grad_diff:beta=1": "grad_diff does not read 'beta'; its keys: alpha, gamma, learning_rate, retain_loss_type",
        "grad_ascent:alpha=1": "grad_ascent does not read 'alpha'; its keys: learning_rate",
        "rmu:rmu_layer=x": "rmu rmu_layer=x is not an integer",
        "rmu:steering_scale=big": "rmu steering_scale=big is not a number",
        "rmu": "grid part 'rmu' is not 'method:key=v1|v2,...'",
        "rmu:rmu_layer": "'rmu_layer' in 'rmu' is not key=v1|v2",
        "rmu:rmu_layer=1;rmu:rmu_layer=2": "'rmu' appears twice",
        "grad_diff:learning_rate=none": "grad_diff learning_rate=none is not a number",  # it cannot be unset
    }
    for text, message in errors.items():
        with pytest.raises(ForgetfulError, match=message):
            parse_grid(text, ["grad_ascent", "grad_diff", "rmu"])


def test_the_plan_over_seeds_shares_grids_and_epochs(tmp_path):
    a = _config(
        "m",
        tmp_path,
        strategies="forget_answers,surprise,goldfish",
        mask_shares="0.1,0.25",
        grid="grad_diff:learning_rate=1e-5|3e-5;rmu:rmu_params=.*,steering_scale=1|none",
        seeds="0,2",
        unlearn_epochs=10.0,
        eval_epochs="2,5,10",
    )
    runs = plan_runs(a)
    seed0 = [
        "full",
        "full_forget_answers",
        "full_surprise_m10",
        "full_surprise_m25",
        "full_goldfish_m10",
        "full_goldfish_m25",
        "full_grad_diff_lr1e-05",
        "full_grad_diff_lr3e-05",
        "full_rmu_paramsall_scale1",
        "full_rmu_paramsall_scalenone",
    ]
    seed2 = ["retain_s2", *(f"{n}_s2" for n in seed0)]
    assert [r.name for r in runs] == ["retain", *seed0, *seed2]
    rmu = runs[9]
    assert (rmu.kind, rmu.strategy, rmu.seed, dict(rmu.point)) == (
        "unlearn",
        "rmu",
        0,
        {"rmu_params": ".*", "steering_scale": 1.0},
    )
    assert rmu.eval_epochs == (2, 5) and rmu.evaluated() == [f"{rmu.name}_ep2", f"{rmu.name}_ep5", rmu.name]
    assert runs[-1].seed == 2 and runs[-1].evaluated()[0] == "full_rmu_paramsall_scalenone_s2_ep2"
    assert dict(runs[10].point) == {"rmu_params": ".*", "steering_scale": None}
    assert (runs[4].share, runs[4].strategy, runs[4].kind) == (0.25, "surprise", "finetune")
    assert point_of({"run": "full_rmu_paramsall_scale1_s2_ep2"}) == "full_rmu_paramsall_scale1_ep2"
    assert point_of({"run": "retain_s2"}) == "retain" and point_of({"run": "full_surprise_m25"}) == "full_surprise_m25"
    # --seed alone: the runs at that seed, and the reference retain run at seed 0
    assert [r.name for r in plan_runs(_config("m", tmp_path, strategies="", unlearning="npo"), seed=3)] == [
        "retain",
        "retain_s3",
        "full_s3",
        "full_npo_s3",
    ]
    errors = {
        "the surprise strategy masks a share.*give --mask-shares": dict(strategies="surprise"),
        r"eval_epochs must be whole numbers from 1 to --unlearn-epochs \(2\), got 3": dict(eval_epochs="1,3"),
        "eval_epochs must be whole numbers.*got 0.5": dict(eval_epochs="0.5"),
        r"mask shares must lie in \(0, 1\], got 1.5": dict(mask_shares="1.5"),
        "seeds must be comma-separated integers": dict(seeds="0,x"),
        "seeds must differ": dict(seeds="1,1"),
        "steering_scale must be positive": dict(grid="rmu:steering_scale=0"),
        "delta must be a number or 'fitted'": dict(unlearning="simnpo", grid="simnpo:delta=big"),
    }
    for message, kw in errors.items():
        with pytest.raises(ForgetfulError, match=message):
            plan_runs(_config("m", tmp_path, **kw))


def test_the_time_estimate():
    run = plan_runs(_config("m", "x", unlearning="npo", strategies=""))[-1]
    assert estimate_seconds(run, []) == (DEFAULT_RUN_SECONDS, "the default for a kind with no finished run")
    rows = [
        {"run": "a", "kind": "unlearn", "strategy": "rmu", "seconds": 10.0},
        {"run": "b", "kind": "unlearn", "strategy": "rmu", "seconds": 20.0},
        {"run": "b_ep1", "kind": "unlearn", "strategy": "npo", "seconds": 1.0, "checkpoint_of": "b"},
        {"run": "full", "kind": "finetune", "strategy": "answer_only", "seconds": 99.0},
    ]
    assert estimate_seconds(run, rows) == (15.0, "mean of 2 finished unlearn run(s)")
    rows.append({"run": "c", "kind": "unlearn", "strategy": "npo", "seconds": 40.0})
    assert estimate_seconds(run, rows) == (40.0, "mean of 1 finished unlearn run(s) of npo")


def _row(run, kind, strategy, fq, mu, seed=0, **kw):
    return {
        "run": run,
        "kind": kind,
        "strategy": strategy,
        "forget_quality": fq,
        "model_utility": mu,
        "seed": seed,
        **kw,
    }


def test_noise_floor_seed_spread_and_best_points_by_hand():
    rows = [
        _row("retain", "finetune", "answer_only", 1.0, 0.30),
        _row("retain_s1", "finetune", "answer_only", 0.9, 0.34, 1),
        _row("retain_s2", "finetune", "answer_only", 0.7, 0.31, 2),
        _row("full", "finetune", "answer_only", 1e-16, 0.40),
        _row("full_s1", "finetune", "answer_only", 1e-15, 0.39, 1),
        # npo: the highest forget quality above 0.95 x 0.40 = 0.38 is the epoch-2 checkpoint (0.01 at 0.385)
        _row("full_npo_lr1e-05", "unlearn", "npo", 1e-3, 0.39),
        _row("full_npo_lr1e-05_ep2", "unlearn", "npo", 1e-2, 0.385, checkpoint_of="full_npo_lr1e-05"),
        _row("full_npo_lr3e-05", "unlearn", "npo", 0.5, 0.30),  # forgets more, keeps too little
        _row("full_npo_lr1e-05_s1", "unlearn", "npo", 0.9, 0.39, 1),  # seed 1 never chooses
        # rmu: no point keeps the utility
        _row("full_rmu", "unlearn", "rmu", 0.2, 0.10),
        _row("full_surprise_m25", "finetune", "surprise", 1e-4, 0.39, masked_share=0.25),
        _row("full_surprise_m25_s1", "finetune", "surprise", 1e-2, 0.37, 1, masked_share=0.25),
    ]
    floor = noise_floor(rows)
    assert floor["forget_quality"] == {"1": 0.9, "2": 0.7}
    assert floor["model_utility"] == {"0": 0.30, "1": 0.34, "2": 0.31}
    assert floor["utility_spread"] == pytest.approx(0.04)
    assert best_points(rows) == {"npo": "full_npo_lr1e-05_ep2", "rmu": None}
    # npo's frontier: lr3e-05 (the highest forget quality), then the checkpoint (less forgetting, more utility),
    # then the end of lr1e-05 (more utility still); seed 1's point is not on the seed-0 plane
    npo = [r for r in rows if r["strategy"] == "npo" and r["seed"] == 0]
    assert [r["run"] for r in frontier(npo)] == ["full_npo_lr1e-05", "full_npo_lr1e-05_ep2", "full_npo_lr3e-05"]
    assert [r["run"] for r in frontier(npo + [_row("worse", "unlearn", "npo", 1e-3, 0.2)])] == [
        r["run"] for r in frontier(npo)
    ]
    assert UTILITY_SHARE == 0.95
    spread = seed_spread(rows)
    assert set(spread) == {"retain", "full", "full_npo_lr1e-05", "full_surprise_m25"}
    assert spread["full_surprise_m25"] == {
        "seeds": [0, 1],
        "forget_quality": {"median": pytest.approx(0.00505), "min": 1e-4, "max": 1e-2},
        "model_utility": {"median": pytest.approx(0.38), "min": 0.37, "max": 0.39},
    }
    assert spread["retain"]["forget_quality"] == {"median": 0.9, "min": 0.7, "max": 1.0}


class _StopAt(TrainerCallback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, args, state, control, **kwargs):
        if round(state.epoch) == self.epoch:
            control.should_training_stop = True


def test_a_checkpoint_is_the_schedule_stopped_at_its_epoch(tiny_model_dir, tmp_path):
    """The epoch-1 checkpoint of a 3-epoch run is the same run (same schedule: warm-up, decay over
    3 epochs) stopped after epoch 1, weight for weight; not a 1-epoch run."""
    c = TofuUnlearnConfig(model=str(tiny_model_dir), out=str(tmp_path / "u"), num_authors=5)

    def args(name):
        return UnlearningConfig(
            output_dir=str(tmp_path / name), method="grad_diff", learning_rate=1e-2, num_train_epochs=3,
            per_device_train_batch_size=2, gradient_accumulation_steps=1, use_cpu=True, report_to="none",
            disable_tqdm=True, logging_strategy="no", seed=0,
        )  # fmt: skip

    model, tok = load_model(str(tiny_model_dir), dtype=torch.float32)
    start = copy.deepcopy(model)
    res = unlearn_tofu(model, tok, c, args("ck"), tmp_path / "u", save_epochs=(1,))
    saved = res["checkpoints"][1]
    steps_per_epoch = res["steps"] // 3
    assert saved["step"] == steps_per_epoch and res["steps"] == 3 * steps_per_epoch
    checkpoint, _ = load_model(saved["path"], dtype=torch.float32)
    options = c.task_options(0)
    forget = prepare_dataset_for_training("tofu", tok, split=c.forget_split, **options)
    retain = prepare_dataset_for_training("tofu", tok, split=c.retain_split, **options)
    stopped = UnlearningTrainer(
        model=start, args=args("stop"), forget_dataset=forget, retain_dataset=retain, processing_class=tok
    )
    stopped.add_callback(_StopAt(1))
    stopped.train()
    assert stopped.state.global_step == steps_per_epoch
    after = dict(checkpoint.named_parameters())
    for name, p in stopped.model.named_parameters():
        assert torch.equal(p, after[name]), name
    final = dict(load_model(str(tmp_path / "u"), dtype=torch.float32)[0].named_parameters())
    assert any(not torch.equal(p, final[n]) for n, p in after.items())  # and it is not the end of the run


def test_the_whole_grid_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "grid"
    kw = dict(
        strategies="forget_answers,surprise,random",
        mask_shares="0.25",
        grid="grad_diff:learning_rate=1e-3|3e-3;rmu:steering_scale=1,rmu_params=.*",
        seeds="0,1",
        eval_epochs="1,2",
    )
    res = run_tofu_experiment(_config(tiny_model_dir, out, **kw), _training())
    assert res["missing_runs"] == []
    results = json.loads((out / "results.json").read_text())
    rows = {r["run"]: r for r in results["runs"]}
    points = ["full_grad_diff_lr0.001", "full_grad_diff_lr0.003", "full_rmu_scale1_paramsall"]
    expected = {"retain", "full", "full_forget_answers", "full_surprise_m25", "full_random_m25"}
    expected |= {f"{p}{e}" for p in points for e in ("", "_ep1")}
    assert set(rows) == expected | {re.sub(r"(_ep\d+)?$", lambda m: "_s1" + m.group(0), n, count=1) for n in expected}
    # checkpoints: the epoch-1 checkpoint of each 2-epoch run, evaluated, then deleted
    for name in (f"{p}{s}" for p in points for s in ("", "_s1")):
        final = rows[name]
        ckpt = rows[name + "_ep1"]
        assert (ckpt["checkpoint_of"], ckpt["epoch"], final["epoch"]) == (name, 1, 2.0)
        assert ckpt["steps"] * 2 == final["steps"] and ckpt["seed"] == final["seed"]
        assert (
            not (out / name / "checkpoints" / "epoch-1").exists() and (out / ckpt["run"] / "tofu_eval.json").is_file()
        )
        assert final["seconds"] == pytest.approx(
            final["train_seconds"] + final["checkpoint_eval_seconds"] + final["eval_seconds"], abs=0.3
        )
    assert rows["full_grad_diff_lr0.003"]["lr"] == 3e-3 and rows["full_grad_diff_lr0.001_s1"]["lr"] == 1e-3
    rmu = rows["full_rmu_scale1_paramsall"]
    state = rmu["method_state"]
    assert rmu["loss_options"]["rmu_params"] == ".*" and state["activation_norm"] > 0
    assert state["steering_coeff"] == pytest.approx(state["activation_norm"])  # scale 1
    # masked shares: exact for surprise and random, 1 for masked answers
    _, tok = load_model(str(tiny_model_dir))
    for name, seed in (("full_surprise_m25", 0), ("full_random_m25", 0), ("full_surprise_m25_s1", 1)):
        ds = prepare_dataset_for_training("tofu", tok, split="forget10", num_authors=5, seed=seed)  # embedded: by seed
        n = sum(sum(m) for m in ds["loss_mask"])
        assert rows[name]["masked_share"] == pytest.approx(masked_count(n, 0.25) / n), name
    assert rows["full_forget_answers"]["masked_share"] == pytest.approx(1.0)
    assert (out / "surprise_scores.json").is_file() and (out / "surprise_scores_s1.json").is_file()
    # forget quality of every seed against retain at seed 0; the noise floor; the spread; the best points
    truth = {n: json.loads((out / n / "forget_per_example.json").read_text())["forget"]["truth_ratio"] for n in rows}
    for name, row in rows.items():
        assert row["forget_quality"] == pytest.approx(forget_quality(truth[name], truth["retain"])), name
    floor = results["noise_floor"]
    assert floor["forget_quality"] == {"1": pytest.approx(forget_quality(truth["retain_s1"], truth["retain"]))}
    mu = [rows["retain"]["model_utility"], rows["retain_s1"]["model_utility"]]
    assert floor["model_utility"] == {"0": mu[0], "1": mu[1]} and floor["utility_spread"] == max(mu) - min(mu)
    spread = results["seed_spread"]["full_grad_diff_lr0.001_ep1"]
    fqs = [
        rows["full_grad_diff_lr0.001_ep1"]["forget_quality"],
        rows["full_grad_diff_lr0.001_s1_ep1"]["forget_quality"],
    ]
    assert spread["seeds"] == [0, 1] and (spread["forget_quality"]["min"], spread["forget_quality"]["max"]) == (
        min(fqs),
        max(fqs),
    )
    assert results["best_points"] == best_points(results["runs"]) and set(results["best_points"]) == {
        "grad_diff",
        "rmu",
    }
    report = (out / "report.md").read_text()
    assert "Noise floor (retain at other seeds against retain seed 0): forget quality seed 1" in report
    assert "not a rerun" in report and "Best points" in report and "Over seeds" in report
    assert (out / "utility_vs_forget_quality.png").stat().st_size > 1000
    # a second call reuses everything; a new grid point that cannot fit the budget is not started
    capsys.readouterr()
    again = run_tofu_experiment(_config(tiny_model_dir, out, **kw), _training())
    assert {r["run"]: r["forget_quality"] for r in again["runs"]} == {n: r["forget_quality"] for n, r in rows.items()}
    assert "training on" not in capsys.readouterr().out
    more = dict(kw, grid="grad_diff:learning_rate=1e-3|3e-3|1e-2;rmu:steering_scale=1,rmu_params=.*", time_budget=1e-3)
    res = run_tofu_experiment(_config(tiny_model_dir, out, **more), _training())
    printed = capsys.readouterr().out
    # the estimate: the mean of the grad_diff runs finished when the run came up (seed 0's two, then all four)
    finals = [r["seconds"] for r in rows.values() if r["strategy"] == "grad_diff" and not r.get("checkpoint_of")]
    seed0 = [rows[p]["seconds"] for p in points[:2]]
    assert (
        f"[full_grad_diff_lr0.01] not started: expected {sum(seed0) / 2:.0f} s (mean of 2 finished unlearn run(s) of grad_diff)"
        in printed
    )
    assert f"[full_grad_diff_lr0.01_s1] not started: expected {sum(finals) / 4:.0f} s (mean of 4 finished" in printed
    assert set(res["missing_runs"]) == {f"full_grad_diff_lr0.01{s}" for s in ("", "_ep1", "_s1", "_s1_ep1")}
    assert math.isclose(
        json.loads((out / "results.json").read_text())["noise_floor"]["utility_spread"], floor["utility_spread"]
    )


def test_the_command_takes_the_grid_options(tiny_model_dir, tmp_path):
    from forgetful.cli import main

    out = tmp_path / "cli"
    argv = ["tofu-experiment", "--model", str(tiny_model_dir), "--out", str(out), "--num-authors", "5"]
    argv += ["--unlearning", "npo,simnpo", "--grid", "npo:beta=0.1|0.5;simnpo:delta=0|fitted", "--seeds", "0,1"]
    argv += ["--eval-epochs", "1", "--unlearn-epochs", "2", "--mask-shares", "0.1,0.5", "--strategies", "surprise"]
    argv += ["--time-budget", "600", "--max_steps", "1", "--only", "retain", "--max-eval-examples", "2"]
    argv += ["--max-new-tokens", "2", "--eval-batch-size", "4", "--disable-tqdm", "true"]
    assert main(argv) == 0
    args = json.loads((out / "results.json").read_text())["args"]
    assert (args["grid"], args["seeds"], args["eval_epochs"], args["mask_shares"], args["time_budget"]) == (
        "npo:beta=0.1|0.5;simnpo:delta=0|fitted",
        "0,1",
        "1",
        "0.1,0.5",
        600.0,
    )
    missing = json.loads((out / "results.json").read_text())["missing_runs"]
    assert "full_simnpo_deltafitted_s1_ep1" in missing and "full_surprise_m50_s1" in missing
