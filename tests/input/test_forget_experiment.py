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
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--task",
        "tofu_qa",
        "--num-authors",
        "24",
        "--keep",
        "0.5",
        "--zero-shot",
        "identity,none,recency,lexical@unit,attention_score",
        "--finetuned",
        "identity,recency@unit",
        "--policies",
        "residual",
        "--policy-layer",
        "1",
        "--policy-hidden-size",
        "8",
        "--policy-steps",
        "3",
        "--policy-eval-steps",
        "2",
        "--warm-rows",
        "4",
        "--warm-steps",
        "2",
        "--val-examples",
        "4",
        "--train-examples",
        "24",
        "--eval-examples",
        "8",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "4",
        "--num-samples",
        "2",
        "--eval-batch-size",
        "4",
        "--bootstrap",
        "200",
        "--disable-tqdm",
    ]
    assert main(args) == 0
    found = json.loads((out / "results.json").read_text())
    assert {"torch", "transformers", "git_commit", "device"} <= set(found["env"])
    rows = found["rows"]
    runs = {r["run"] for r in rows}
    assert runs == {"policy_residual_0.5", "zero_shot_0.5", "ft_identity", "ft_recency@task_0.5", "ft_residual_0.5"}
    trained = next(r for r in rows if r["protocol"] == "policy_training")
    assert (
        trained["strategy"] == "residual@task"
        and trained["chosen"] in ("prior", "warm start")
        or trained["chosen"].startswith("reinforce step")
    )
    assert trained["val_nll_best"] <= trained["val_nll_prior"]  # the kept policy is never worse than its prior
    scored = [r for r in rows if r["protocol"] != "policy_training"]
    for r in scored:
        for key in ("task", "protocol", "strategy", "keep_ratio", "nll", "kept_tokens", "flops_ratio", "rouge"):
            assert key in r, key
        assert math.isfinite(r["nll"]) and 0 <= r["rouge"] <= 1
    # every strategy that forgets keeps the same number of tokens
    assert len({r["kept_tokens"] for r in scored if r["strategy"] not in ("identity", "none")}) == 1
    protocols = {(r["protocol"], r["strategy"]) for r in scored}
    assert {("zero_shot", "residual@task"), ("finetuned", "residual@task"), ("finetuned", "recency@task")} <= protocols
    assert ("zero_shot", "lexical@task") in protocols
    # the same LM budget for every finetuned strategy; learned rows carry their bootstrap interval
    finetuned = [r for r in scored if r["protocol"] == "finetuned"]
    assert len({r["lm_sequences"] for r in finetuned}) == 1 and finetuned[0]["lm_sequences"] > 0
    for r in (r for r in scored if r["strategy"] == "residual@task"):
        low, high = r["ci95"]
        assert low <= r["diff_vs_best"] <= high and r["best_baseline"] not in ("identity", "residual@task")
    assert (out / "policies" / "residual_0.5" / "policy_config.json").is_file()
    assert (out / "policies" / "residual_0.5" / "training.png").is_file()
    assert (out / "report.md").is_file() and (out / "nll_zero_shot.png").is_file()
    # one process wrote every run: one configuration, naming them all
    (entry,) = found["configs"]
    assert set(entry["runs"]) == runs and entry["config"]["keep"] == "0.5" and entry["config"]["training"]["seed"] == 0
    # a second call finds every run done and changes nothing
    before = (out / "results.json").read_text()
    assert main(args) == 0 and (out / "results.json").read_text() == before


def test_strategy_lists_spell_out_the_unit_and_refuse_learned_baselines():
    from forgetful.errors import ForgetfulError
    from forgetful.input.experiment import ForgetExperimentConfig

    c = ForgetExperimentConfig(model="m", zero_shot="identity,recency,recency@unit,lexical@token,lexical@chunk:8")
    assert c.unit == "task" and c.prior == "lexical"
    assert c.strategies("zero_shot") == ["identity", "recency", "recency@task", "lexical", "lexical@chunk:8"]
    t = ForgetExperimentConfig(model="m", task="text", train_file="a", eval_file="b", finetuned="recency@unit")
    assert t.unit == "sentence" and t.prior == "recency" and t.strategies("finetuned") == ["recency@sentence"]
    runs = [
        name for name, *_ in ForgetExperimentConfig(model="m", keep="0.5,0.25", finetuned="identity,recency").runs()
    ]
    assert runs == [
        "policy_residual_0.5",
        "zero_shot_0.5",
        "policy_residual_0.25",
        "zero_shot_0.25",
        "ft_identity",
        "ft_residual_0.5",
        "ft_recency_0.5",
        "ft_residual_0.25",
        "ft_recency_0.25",
    ]
    for bad, msg in (
        (dict(zero_shot="residual"), "zero_shot and finetuned take strategies that are not learned"),
        (dict(policies="recency"), "policies takes learned ones"),
        (dict(zero_shot="recency@page"), "unknown unit 'page'"),
        (dict(zero_shot="transformer"), "zero_shot: unknown strategy transformer"),
        (dict(finetune_epochs=0), "finetune_epochs must be at least 1"),
        (dict(keep="1.5"), "keep ratios must lie in (0, 1)"),
    ):
        with pytest.raises(ForgetfulError, match=re.escape(msg)):
            ForgetExperimentConfig(model="m", **bad)


def test_the_report_ranks_strategies_per_keep_and_marks_the_learned(tmp_path, monkeypatch):
    from forgetful.input import experiment_results
    from forgetful.input.experiment import ForgetExperimentConfig
    from forgetful.input.experiment_results import _report
    from forgetful.input.reinforce import ForgetTrainingConfig

    drawn = []
    monkeypatch.setattr(experiment_results, "plot_ranked_bars", lambda panels, path, **kw: drawn.append((panels, kw)))

    def row(strategy, keep, nll, protocol="zero_shot"):
        return {"strategy": strategy, "keep_ratio": keep, "nll": nll, "protocol": protocol, "kept_tokens": 5}

    rows = [row("identity", 0.5, 1.0), row("none", 0.5, 3.0), row("recency", 0.5, 2.0), row("residual@task", 0.5, 1.5)]
    rows += [row("identity", 0.25, 1.0), row("recency", 0.25, 2.2), row("residual@task", 0.25, 1.9)]
    _report(rows, ForgetExperimentConfig(model="m", keep="0.5,0.25"), ForgetTrainingConfig(), tmp_path)
    panels, kw = drawn.pop()
    assert list(panels) == ["keep 0.5", "keep 0.25"]
    assert {b["label"]: b["highlight"] for b in panels["keep 0.5"]} == {"recency": False, "residual@task": True}
    assert kw["levels"] == {"full context": 1.0}
    assert (tmp_path / "report.md").read_text().count("nll_zero_shot.png") == 1


def test_the_paired_bootstrap_resamples_whole_groups():
    from forgetful.input.evaluation import paired_bootstrap

    # two groups: in group 0 a is better by 1 nat per token, in group 1 equal
    a = {"nll_sum": [1.0, 1.0, 4.0, 4.0], "tokens": [1, 1, 2, 2], "group": [0, 0, 1, 1]}
    b = {"nll_sum": [2.0, 2.0, 4.0, 4.0], "tokens": [1, 1, 2, 2], "group": [0, 0, 1, 1]}
    diff, low, high = paired_bootstrap(a, b, resamples=500, seed=0)
    assert diff == pytest.approx((10 / 6) - (12 / 6))
    # a resample holds group 0 twice (-1), group 1 twice (0) or one of each (-1/3)
    assert low == pytest.approx(-1.0) and high == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(a, {**b, "group": [0, 1, 1, 1]})


def test_results_keep_the_configuration_of_every_run():
    """Processes of other keep ratios share a folder: each run is filed under the configuration
    that wrote it, a run written again moves, an entry left empty goes."""
    from forgetful.input.experiment_results import _configs_with

    a, b = {"keep": "0.5", "training": {"seed": 0}}, {"keep": "0.25", "training": {"seed": 0}}
    configs = _configs_with({}, "zero_shot_0.5", a)
    configs = _configs_with({"configs": configs}, "ft_identity", a)
    configs = _configs_with({"configs": configs}, "zero_shot_0.25", b)
    assert configs == [
        {"config": a, "runs": ["zero_shot_0.5", "ft_identity"]},
        {"config": b, "runs": ["zero_shot_0.25"]},
    ]
    configs = _configs_with({"configs": configs}, "zero_shot_0.25", a)  # run again by the first configuration
    assert configs == [{"config": a, "runs": ["zero_shot_0.5", "ft_identity", "zero_shot_0.25"]}]
    assert _configs_with({"config": a, "rows": []}, "r", b) == [{"config": b, "runs": ["r"]}]  # the older layout
