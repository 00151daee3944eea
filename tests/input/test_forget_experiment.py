"""The fair-protocol experiment (forgetful.input.experiment) and its TOFU-QA task, at toy size."""

from __future__ import annotations

import json
import math
import re

import pytest

from forgetful.cli import main
from forgetful.data.tofu import load_tofu_split
from forgetful.input.examples import tofu_qa_examples


def test_tofu_qa_never_puts_a_held_out_author_into_training(tiny_llama, shared_data):
    _, tok = tiny_llama
    source = shared_data / "tofu"
    train = tofu_qa_examples(tok, source, part="train", questions_per_author=1)
    held = tofu_qa_examples(tok, source, part="eval", questions_per_author=2)
    assert (len(train), len(held)) == (180, 40)
    full = load_tofu_split(source, "full")
    held_answers = {r["answer"] for r in full[-400:]}
    assert set(held["answer"]) <= held_answers and not set(train["answer"]) & held_answers
    train_text = "\n".join(tok.batch_decode(list(train["context_ids"])))
    leaked = [a for a in held_answers if a in train_text]
    assert leaked == [], f"{len(leaked)} held-out answers appear in training passages"
    row = held[0]
    assert sum(row["fact_mask"]) > 0 and not any(f and p for f, p in zip(row["fact_mask"], row["protect_mask"]))
    question = tok.decode([t for t, p in zip(row["context_ids"], row["protect_mask"]) if p])
    assert "Question:" in question and full[-400]["question"] in question  # the question is what is protected
    assert tok.decode([t for t, f in zip(row["context_ids"], row["fact_mask"]) if f]).strip() == row["answer"]


@pytest.mark.slow
def test_the_fair_protocol_experiment_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "exp"
    args = [
        "forget-experiment",
        *("--model", str(tiny_model_dir), "--out", str(out), "--task", "tofu_qa", "--num-authors", "24"),
        *("--keep", "0.5", "--zero-shot", "identity,none,recency,lexical@unit,snapkv:layer=1@unit"),
        *("--finetuned", "identity,recency@unit", "--oracle", "oracle:rounds=1@unit", "--oracle-examples", "6"),
        *("--policies", "residual", "--learners", "reinforce,relaxed,supervised", "--seeds", "0,1"),
        *("--policy-layer", "1", "--policy-hidden-size", "8", "--policy-steps", "3", "--policy-eval-steps", "2"),
        *("--warm-rows", "4", "--warm-steps", "2", "--label-rows", "4", "--label-rounds", "1"),
        *("--val-examples", "4", "--train-examples", "24", "--eval-examples", "8", "--max-new-tokens", "4"),
        *("--questions-per-author", "2"),
        *("--batch-size", "4", "--num-samples", "2", "--eval-batch-size", "4", "--bootstrap", "200"),
        "--disable-tqdm",
    ]
    assert main(args) == 0
    found = json.loads((out / "results.json").read_text())
    assert {"torch", "transformers", "git_commit", "device"} <= set(found["env"])
    rows = found["rows"]
    runs = {r["run"] for r in rows}
    learned = {
        f"residual_{learner}_0.5_s{seed}" for learner in ("reinforce", "relaxed", "supervised") for seed in (0, 1)
    }
    fine = {f"ft_residual_{learner}_0.5_s0" for learner in ("reinforce", "relaxed", "supervised")}
    assert runs == {f"policy_{x}" for x in learned} | fine | {
        "zero_shot_0.5",
        "oracle_0.5",
        "ft_identity",
        "ft_recency@task_0.5",
    }
    trained = [r for r in rows if r["protocol"] == "policy_training"]
    assert {(r["learner"], r["seed"]) for r in trained} == {
        (x, s) for x in ("reinforce", "relaxed", "supervised") for s in (0, 1)
    }
    for r in trained:
        assert r["strategy"] == "residual@task" and r["prior"] == "lexical"
        assert r["val_nll_selected"] <= r["val_nll_prior"]  # the kept version is never worse there (selection)
        assert r["lm_tokens_forward"] > 0
    relaxed = next(r for r in trained if r["learner"] == "relaxed")
    assert relaxed["lm_tokens_backward"] == relaxed["lm_tokens_forward"]
    scored = [r for r in rows if r["protocol"] != "policy_training"]
    for r in scored:
        for key in ("task", "protocol", "strategy", "keep_ratio", "nll", "kept_tokens", "flops_ratio", "rouge"):
            assert key in r, key
        assert math.isfinite(r["nll"]) and 0 <= r["rouge"] <= 1
    # every strategy that forgets at the run's keep ratio keeps the same number of tokens
    plain = [r for r in scored if r["strategy"] not in ("identity", "none") and not r.get("flops_matched_for")]
    assert len({round(r["kept_tokens"], 6) for r in plain if not r.get("reference")}) == 1
    oracle = next(r for r in scored if r.get("reference"))
    assert oracle["strategy"] == "oracle:rounds=1@task" and oracle["rows"] == 6
    assert oracle["oracle_search"]["oracle_nll"] <= oracle["oracle_search"]["start_nll"] + 1e-6
    zero = [r for r in scored if r["protocol"] == "zero_shot" and r.get("learner")]
    assert {(r["learner"], r["seed"]) for r in zero} == {
        (x, s) for x in ("reinforce", "relaxed", "supervised") for s in (0, 1)
    }
    for r in zero:
        for key in ("vs_matched", "vs_best", "vs_prior", "vs_equal_flops"):
            c = r[key]
            assert c["ci95"][0] <= c["diff"] <= c["ci95"][1] and 0 < c["p"] <= 1 and c["groups"] == 4, key
        assert r["vs_prior"]["baseline"] == "lexical@task"
        assert r["vs_equal_flops"]["baseline"] == "recency"
        assert r["vs_matched"]["baseline"] != "snapkv:layer=1@task" or r["flops_ratio"] >= 0  # matched by FLOPs
        assert r["gap"]["oracle_rows"] == 6 and "headroom_ci95" in r["gap"]
    matched = [r for r in scored if r.get("flops_matched_for")]
    assert len(matched) == 6 and all(r["keep_ratio_used"] > 0.5 for r in matched)  # a policy costs FLOPs: more kept
    # the same LM budget for every finetuned strategy
    finetuned = [r for r in scored if r["protocol"] == "finetuned"]
    assert len({r["lm_sequences"] for r in finetuned}) == 1 and finetuned[0]["lm_sequences"] > 0
    assert {r["learner"] for r in finetuned if r.get("learner")} == {"reinforce", "relaxed", "supervised"}
    for name in learned:
        assert (out / "policies" / name / "policy_config.json").is_file()
        assert (out / "policies" / name / "training.png").is_file()
    report = (out / "report.md").read_text()
    assert "A selection statistic" in report and "Over seeds" in report and "Headroom" in report
    assert (out / "nll_zero_shot.png").is_file() and (out / "nll_vs_flops_zero_shot_0.5.png").is_file()
    # one process wrote every run: one configuration, naming them all
    (entry,) = found["configs"]
    assert set(entry["runs"]) == runs and entry["config"]["keep"] == "0.5" and entry["config"]["training"]["seed"] == 0
    # a second call finds every run done and changes nothing
    before = (out / "results.json").read_text()
    assert main(args) == 0 and (out / "results.json").read_text() == before


@pytest.mark.slow
def test_the_text_task_scores_unread_tokens_in_blocks(tiny_model_dir, tmp_path):
    from forgetful.data.embedded import pretraining_documents

    text = tmp_path / "text.txt"
    text.write_text("\n".join(pretraining_documents(60, seed=3)))
    out = tmp_path / "text_exp"
    args = [
        "forget-experiment",
        *("--model", str(tiny_model_dir), "--out", str(out), "--task", "text", "--train-file", str(text)),
        *("--eval-file", str(text), "--context-length", "48", "--target-length", "8", "--unread-length", "8"),
        *("--block-windows", "3", "--eval-examples", "12", "--train-examples", "24", "--keep", "0.25"),
        *(
            "--zero-shot",
            "identity,recency,recency@unit",
            "--finetuned",
            "identity",
            "--oracle",
            "oracle:rounds=1@chunk:8",
        ),
        *("--policies", "residual", "--learners", "relaxed", "--policy-layer", "1", "--policy-hidden-size", "8"),
        *("--policy-steps", "2", "--policy-eval-steps", "2", "--val-examples", "4", "--batch-size", "4"),
        *(
            "--eval-batch-size",
            "4",
            "--bootstrap",
            "200",
            "--only",
            "policy_residual_relaxed_0.25_s0,oracle_0.25,zero_shot_0.25",
        ),
        "--disable-tqdm",
    ]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    scored = [r for r in rows if r["protocol"] == "zero_shot"]
    assert all(r["nll_unread"] is not None and math.isfinite(r["nll_unread"]) for r in scored)
    examples = json.loads((out / "per_example.json").read_text())["zero_shot_0.25"]
    recency = examples["recency@0.25"]
    assert recency["group"] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and set(recency["unread_tokens"]) == {8}
    learned = next(r for r in scored if r.get("learner"))
    assert learned["vs_prior"]["groups"] == 4 and learned["vs_prior"]["baseline"] == "recency@sentence"
    assert "gap_unread" in learned and learned["gap_unread"]["oracle_rows"] == 12

    # --report-only runs nothing: the rows stay, and the report names the configuration that ran each run,
    # not the options of the reporting call
    def scores(found):
        return sorted((r["run"], r["strategy"], str(r.get("learner")), r.get("nll") or 0.0) for r in found)

    before = scores(rows)
    plain = [a for a in args if a != "--disable-tqdm"]
    only = plain.index("--zero-shot")
    assert main([*plain[:only], *plain[only + 2 :], "--report-only", "true"]) == 0
    again = json.loads((out / "results.json").read_text())["rows"]
    assert scores(again) == before
    report = (out / "report.md").read_text()
    (listed,) = re.findall(r"Config of ([^:]+):", report)
    assert set(listed.split(", ")) == {"policy_residual_relaxed_0.25_s0", "oracle_0.25", "zero_shot_0.25"}
    assert "'zero_shot': 'identity,recency,recency@unit'" in report and "'report_only': True" not in report


def test_strategy_lists_spell_out_the_unit_and_refuse_learned_baselines():
    from forgetful.errors import ForgetfulError
    from forgetful.input.experiment import ForgetExperimentConfig

    c = ForgetExperimentConfig(model="m", zero_shot="identity,recency,recency@unit,lexical@token,lexical@chunk:8")
    assert c.unit == "task" and c.prior == "lexical"
    assert c.strategies("zero_shot") == ["identity", "recency", "recency@task", "lexical", "lexical@chunk:8"]
    t = ForgetExperimentConfig(model="m", task="text", train_file="a", eval_file="b", finetuned="recency@unit")
    assert t.unit == "sentence" and t.prior == "recency" and t.strategies("finetuned") == ["recency@sentence"]
    runs = [
        name
        for name, *_ in ForgetExperimentConfig(
            model="m", keep="0.5,0.25", finetuned="identity,recency", learners="reinforce,relaxed", seeds="0,1"
        ).runs()
    ]
    assert runs == [
        "policy_residual_reinforce_0.5_s0",
        "policy_residual_reinforce_0.5_s1",
        "policy_residual_relaxed_0.5_s0",
        "policy_residual_relaxed_0.5_s1",
        "zero_shot_0.5",
        "oracle_0.5",
        "policy_residual_reinforce_0.25_s0",
        "policy_residual_reinforce_0.25_s1",
        "policy_residual_relaxed_0.25_s0",
        "policy_residual_relaxed_0.25_s1",
        "zero_shot_0.25",
        "oracle_0.25",
        "ft_identity",
        "ft_residual_reinforce_0.5_s0",
        "ft_residual_relaxed_0.5_s0",
        "ft_recency_0.5",
        "ft_residual_reinforce_0.25_s0",
        "ft_residual_relaxed_0.25_s0",
        "ft_recency_0.25",
    ]
    for bad, msg in (
        (dict(zero_shot="residual"), "zero_shot, finetuned and flops_matched take strategies that are not learned"),
        (dict(learners="reinforce,sgd"), "unknown learner(s) sgd"),
        (dict(seeds="0,x"), "seeds must be integers"),
        (dict(oracle="recency@unit"), "oracle takes the oracle strategy"),
        (dict(policies="recency"), "policies takes learned ones"),
        (dict(zero_shot="recency@page"), "unknown unit 'page'"),
        (dict(zero_shot="transformer"), "zero_shot: unknown strategy transformer"),
        (dict(finetune_epochs=0), "finetune_epochs must be at least 1"),
        (dict(keep="1.5"), "keep ratios must lie in (0, 1)"),
    ):
        with pytest.raises(ForgetfulError, match=re.escape(msg)):
            ForgetExperimentConfig(model="m", **bad)


def test_the_report_ranks_strategies_per_keep_and_marks_the_learned(tmp_path, monkeypatch):
    from forgetful.input import experiment_report
    from forgetful.input.experiment import ForgetExperimentConfig
    from forgetful.input.reinforce import ForgetTrainingConfig

    drawn = []
    monkeypatch.setattr(experiment_report, "plot_ranked_bars", lambda panels, path, **kw: drawn.append((panels, kw)))

    def row(strategy, keep, nll, protocol="zero_shot", **extra):
        return {"strategy": strategy, "keep_ratio": keep, "nll": nll, "protocol": protocol, "kept_tokens": 5, **extra}

    mine = dict(learner="relaxed", seed=0, label="residual@task [relaxed s0]", flops_ratio=0.5)
    rows = [
        row("identity", 0.5, 1.0),
        row("none", 0.5, 3.0),
        row("recency", 0.5, 2.0),
        row("residual@task", 0.5, 1.5, **mine),
    ]
    rows += [row("identity", 0.25, 1.0), row("recency", 0.25, 2.2), row("residual@task", 0.25, 1.9, **mine)]
    rows[3]["vs_matched"] = {"baseline": "recency", "diff": -0.5, "ci95": [-0.7, -0.3], "p": 0.01, "p_exact": True}
    experiment_report.write_experiment_report(
        rows, ForgetExperimentConfig(model="m", keep="0.5,0.25"), ForgetTrainingConfig(), tmp_path
    )
    panels, kw = drawn.pop()
    assert list(panels) == ["keep 0.5", "keep 0.25"]
    assert {b["label"]: b["highlight"] for b in panels["keep 0.5"]} == {
        "recency": False,
        "residual@task [relaxed s0]": True,
    }
    assert kw["levels"] == {"full context": 1.0}
    report = (tmp_path / "report.md").read_text()
    assert report.count("nll_zero_shot.png") == 1
    assert "**-0.500 [-0.700, -0.300]** p=0.010 (recency)" in report  # an interval below 0 is bold
    assert "| zero_shot | 0.500 | residual@task | relaxed | 1 | 1 of 1 | -0.500 |  |  |" in report


def test_the_paired_bootstrap_resamples_whole_groups():
    from forgetful.errors import ForgetfulError
    from forgetful.input.stats import paired_bootstrap

    # two groups: in group 0 a is better by 1 nat per token, in group 1 equal
    a = {"nll_sum": [1.0, 1.0, 4.0, 4.0], "tokens": [1, 1, 2, 2], "group": [0, 0, 1, 1]}
    b = {"nll_sum": [2.0, 2.0, 4.0, 4.0], "tokens": [1, 1, 2, 2], "group": [0, 0, 1, 1]}
    diff, low, high = paired_bootstrap(a, b, resamples=500, seed=0)
    assert diff == pytest.approx((10 / 6) - (12 / 6))
    # a resample holds group 0 twice (-1), group 1 twice (0) or one of each (-1/3)
    assert low == pytest.approx(-1.0) and high == pytest.approx(0.0)
    with pytest.raises(ForgetfulError, match="same examples"):
        paired_bootstrap(a, {**b, "group": [0, 1, 1, 1]})


def test_results_keep_the_configuration_of_every_run():
    """Processes of other keep ratios share a folder: each run is filed under the configuration
    that wrote it, a run written again moves, an entry left empty goes."""
    from forgetful.input.experiment_results import configs_with

    a, b = {"keep": "0.5", "training": {"seed": 0}}, {"keep": "0.25", "training": {"seed": 0}}
    configs = configs_with({}, "zero_shot_0.5", a)
    configs = configs_with({"configs": configs}, "ft_identity", a)
    configs = configs_with({"configs": configs}, "zero_shot_0.25", b)
    assert configs == [
        {"config": a, "runs": ["zero_shot_0.5", "ft_identity"]},
        {"config": b, "runs": ["zero_shot_0.25"]},
    ]
    configs = configs_with({"configs": configs}, "zero_shot_0.25", a)  # run again by the first configuration
    assert configs == [{"config": a, "runs": ["zero_shot_0.5", "ft_identity", "zero_shot_0.25"]}]
    assert configs_with({"config": a, "rows": []}, "r", b) == [{"config": b, "runs": ["r"]}]  # the older layout


def test_a_zero_shot_run_is_made_again_when_policies_were_added():
    from forgetful.input.experiment import ForgetExperimentConfig, stale_zero_shot_runs

    config = ForgetExperimentConfig(model="m", keep="0.5,0.25", learners="reinforce,relaxed", seeds="0,1")
    rows = [
        {"run": "zero_shot_0.5", "learner": None, "seed": None},
        {"run": "zero_shot_0.5", "learner": "reinforce", "seed": 0},
        {"run": "zero_shot_0.25", "learner": None, "seed": None},
    ] + [{"run": "zero_shot_0.25", "learner": x, "seed": s} for x in ("reinforce", "relaxed") for s in (0, 1)]
    assert stale_zero_shot_runs(config, rows) == {"zero_shot_0.5"}  # seeds and a learner were added since
    rows += [{"run": "zero_shot_0.5", "learner": x, "seed": s} for x in ("reinforce", "relaxed") for s in (0, 1)]
    assert stale_zero_shot_runs(config, rows) == set()
    assert stale_zero_shot_runs(config, []) == set()  # a run never made is not stale: it is to be made


def test_a_run_starts_only_if_its_expected_time_fits_the_budget():
    from forgetful.errors import ForgetfulError
    from forgetful.input.experiment import DEFAULT_RUN_SECONDS, ForgetExperimentConfig, expected_seconds

    rows = [
        {"run": "policy_residual_relaxed_0.5_s0", "protocol": "policy_training", "learner": "relaxed", "seconds": 40.0},
        {"run": "policy_residual_relaxed_0.5_s1", "protocol": "policy_training", "learner": "relaxed", "seconds": 60.0},
        {
            "run": "policy_residual_reinforce_0.5_s0",
            "protocol": "policy_training",
            "learner": "reinforce",
            "seconds": 9.0,
        },
        {"run": "zero_shot_0.5", "protocol": "zero_shot", "seconds": 120.0},
        {"run": "zero_shot_0.5", "protocol": "zero_shot", "seconds": 120.0},  # a run's rows share its seconds
        {"run": "oracle_0.5", "protocol": "zero_shot", "reference": True, "seconds": 500.0},
    ]
    assert expected_seconds("policy", "residual|relaxed|2", rows) == (50.0, "mean of 2 finished run(s) of its kind")
    assert expected_seconds("zero_shot", "", rows)[0] == 120.0
    assert expected_seconds("oracle", "oracle@task", rows)[0] == 500.0
    assert expected_seconds("finetuned", "recency", rows) == (DEFAULT_RUN_SECONDS, "no finished run of its kind yet")
    with pytest.raises(ForgetfulError, match="time_budget must be positive"):
        ForgetExperimentConfig(model="m", time_budget=0)
