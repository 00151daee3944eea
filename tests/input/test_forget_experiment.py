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
        "--keeps",
        "0.5",
        "--zero-shot",
        "identity,none,recency,attention_score",
        "--finetuned",
        "identity,recency",
        "--policies",
        "mlp,hidden_state",
        "--exploration",
        "0.5",
        "--train-examples",
        "16",
        "--eval-examples",
        "8",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "4",
        "--num-samples",
        "2",
        "--max-steps-per-epoch",
        "2",
        "--eval-batch-size",
        "4",
        "--disable-tqdm",
    ]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    runs = {r["run"] for r in rows}
    assert runs == {"zero_shot", "ft_identity", "ft_recency_0.5", "joint_mlp_0.5", "joint_hidden_state_0.5"}
    for r in rows:
        for key in ("task", "protocol", "strategy", "keep_ratio", "nll", "kept_tokens", "flops_ratio", "rouge"):
            assert key in r, key
        assert math.isfinite(r["nll"]) and 0 <= r["rouge"] <= 1
    # every strategy that forgets keeps the same number of tokens
    budgeted = {r["kept_tokens"] for r in rows if r["strategy"] not in ("identity", "none")}
    assert len(budgeted) == 1
    protocols = {(r["protocol"], r["strategy"]) for r in rows}
    assert ("finetuned", "recency") in protocols and ("zero_shot", "recency") in protocols
    assert ("finetuned", "hidden_state") in protocols
    assert (out / "report.md").is_file() and (out / "nll_zero_shot.png").is_file()
    # a second call finds every run done and changes nothing
    before = (out / "results.json").read_text()
    assert main(args) == 0 and (out / "results.json").read_text() == before


def test_baselines_get_as_many_lm_epochs_as_a_learned_policy():
    from forgetful.errors import ForgetfulError
    from forgetful.input.experiment import ForgetExperimentConfig

    assert ForgetExperimentConfig(model="m", exploration="0.5,0").finetune_epochs == 2
    assert ForgetExperimentConfig(model="m", exploration="0.75,0.5,0").finetune_epochs == 3
    assert ForgetExperimentConfig(model="m", exploration="0.5,0", finetune_epochs=1).finetune_epochs == 1
    assert ForgetExperimentConfig(model="m", exploration="0.5,0").exploration_shares == [0.5, 0.0]
    for bad, msg in (
        (dict(exploration="a,b"), "exploration must be shares like 0.5,0, got 'a,b'"),
        (dict(exploration="1.5"), "--exploration '1.5': reinforce_model: exploration_epochs entries are shares"),
        (dict(exploration=","), "--exploration ',': exploration_epochs is empty"),
        (dict(finetune_epochs=0), "finetune_epochs must be at least 1"),
    ):
        with pytest.raises(ForgetfulError, match="^" + re.escape(msg)):
            ForgetExperimentConfig(model="m", **bad)


def test_the_report_draws_bars_for_one_keep_ratio_and_lines_for_several(tmp_path, monkeypatch):
    from forgetful.input import experiment
    from forgetful.input.experiment import ForgetExperimentConfig, _report
    from forgetful.input.reinforce import ForgetTrainingConfig

    drawn = []
    monkeypatch.setattr(experiment, "plot_bars", lambda values, path, **kw: drawn.append(("bars", values, kw)))
    monkeypatch.setattr(experiment, "plot_lines", lambda series, path, **kw: drawn.append(("lines", series, kw)))

    def row(strategy, keep, nll, protocol="zero_shot"):
        return {"strategy": strategy, "keep_ratio": keep, "nll": nll, "protocol": protocol, "kept_tokens": 5}

    one = [row("identity", 0.5, 1.0), row("none", 0.5, 3.0), row("recency", 0.5, 2.0), row("random", 0.5, 2.5)]
    _report(one, ForgetExperimentConfig(model="m", keeps="0.5"), ForgetTrainingConfig(), tmp_path)
    kind, values, kw = drawn.pop()
    assert kind == "bars" and values == {"recency": 2.0, "random": 2.5}
    assert kw["levels"] == {"full context": 1.0, "no context": 3.0} and "keep 0.5" in kw["title"]

    two = one + [row("identity", 0.25, 1.0), row("recency", 0.25, 2.2), row("random", 0.25, 2.9)]
    _report(two, ForgetExperimentConfig(model="m", keeps="0.5,0.25"), ForgetTrainingConfig(), tmp_path)
    kind, series, _ = drawn.pop()
    assert kind == "lines" and series["recency"] == ([0.5, 0.25], [2.0, 2.2])
    assert (tmp_path / "report.md").read_text().count("nll_zero_shot.png") == 1
