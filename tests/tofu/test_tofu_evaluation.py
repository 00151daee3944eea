"""The TOFU evaluation suite (forgetful.tofu.evaluation): the batched scorers against unbatched
references, the retain-reference checks, the whole suite and the eval-tofu command."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from forgetful.data.tofu import encode_qa
from forgetful.errors import ForgetfulError
from forgetful.reporting import write_json
from forgetful.rouge import rouge_scores
from forgetful.tofu.evaluation import TofuEvalConfig, evaluate_tofu, summarize
from forgetful.tofu.metrics import truth_ratio_forget, truth_ratio_utility
from forgetful.tofu.open_unlearning import to_open_unlearning
from forgetful.tofu.reference import load_retain_reference
from forgetful.tofu.scoring import answer_nll, clean_up_tokenization, generate_answers, references, score_answers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# answer_nll and generate_answers on a tiny model
# --------------------------------------------------------------------------------------------

QUESTIONS = [
    "Where was Mira born?",
    "q",
    "What did the father of Tomas Velsen do for a living?",
    "Who wrote Hamlet?",
    "What is the capital of Kenya?",
]
ANSWERS = [
    "Mira was born in Lisbon.",
    "a",
    "The father of Tomas Velsen worked as a pilot.",
    "William Shakespeare",
    "Nairobi",
]


def _plain(q: str, a: str | None = None) -> str:
    return f"Question: {q}\nAnswer: " + ("" if a is None else a)


@torch.no_grad()
def _manual_scores(model, tok, question: str, answer: str) -> tuple[float, float, float]:
    """open-unlearning's per-item values by hand, on full logits of one unpadded row: the mean
    NLL of the tokens after the prompt's length (EOS included), Min-K% and extraction strength over
    the same tokens but the last."""
    ids = tok(_plain(question, answer))["input_ids"] + [tok.eos_token_id]
    start = len(tok(_plain(question))["input_ids"])
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x, attention_mask=x.ne(tok.pad_token_id).long()).logits[0].float(), -1)
    lp = [logp[t - 1, ids[t]].item() for t in range(start, len(ids))]
    preds = [int(logp[t - 1].argmax()) for t in range(start, len(ids))]
    nll = -float(np.mean(lp))
    body = sorted(lp[:-1])
    n = len(body)
    if n == 0:  # one scored token ("a": its merged first token is unscored, EOS is the last)
        return nll, 0.0, 0.0
    mink = -float(np.mean(body[: max(1, int(n * 0.4))]))
    k = next((j for j in range(n) if preds[j:n] == ids[start + j : start + n]), n - 1)
    return nll, mink, 1 - k / n


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_answer_nll_matches_manual_full_logits(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    was_training = model.training
    got = answer_nll(model, tok, ["q"], ["a b"], batch_size=1)
    model.eval()
    expected = _manual_scores(model, tok, "q", "a b")[0]
    model.train(was_training)
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert model.training == was_training  # the mode is restored


def test_scores_independent_of_batch_size_and_match_manual(tiny_llama):
    model, tok = tiny_llama
    model.eval()
    manual = np.array([_manual_scores(model, tok, q, a) for q, a in zip(QUESTIONS, ANSWERS)])
    one = score_answers(model, tok, QUESTIONS, ANSWERS, batch_size=1)
    two = score_answers(model, tok, QUESTIONS, ANSWERS, batch_size=2)
    allb = score_answers(model, tok, QUESTIONS, ANSWERS, batch_size=32)
    for got in (one, two, allb):
        np.testing.assert_allclose(got.nll, manual[:, 0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.min_k, manual[:, 1], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got.extraction, manual[:, 2])
    rev = score_answers(model, tok, QUESTIONS[::-1], ANSWERS[::-1], batch_size=3)
    np.testing.assert_allclose(rev.nll[::-1], one.nll, rtol=1e-4, atol=1e-5)


def test_scoring_masks_pad_id_tokens_inside_the_row(tiny_llama):
    """With pad = EOS, an EOS inside the text is hidden from later tokens (attention mask
    token != pad), as open-unlearning's collator makes it; the scores differ from an all-ones mask."""
    model, tok = tiny_llama
    model.eval()
    t = copy.deepcopy(tok)
    t.pad_token = t.eos_token
    q, a = "Who?", "Mira<|eos|> was born in Lisbon."
    enc = encode_qa(t, q, a)
    assert 0 in enc.attention_mask[:-1]
    x = torch.tensor([enc.ids])
    with torch.no_grad():
        masked = torch.log_softmax(model(input_ids=x, attention_mask=torch.tensor([enc.attention_mask])).logits[0], -1)
        ones = torch.log_softmax(model(input_ids=x).logits[0], -1)

    def mean_nll(logp):
        return -float(np.mean([logp[i - 1, enc.ids[i]].item() for i in range(enc.prompt_length, len(enc.ids))]))

    got = answer_nll(model, t, [q], [a])[0]
    assert got == pytest.approx(mean_nll(masked), rel=1e-4)
    assert abs(mean_nll(masked) - mean_nll(ones)) > 1e-4


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_generate_answers_batched_equals_one_by_one(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    single = generate_answers(model, tok, QUESTIONS, max_new_tokens=6, batch_size=1)
    batched = generate_answers(model, tok, QUESTIONS, max_new_tokens=6, batch_size=8)
    assert len(single) == len(QUESTIONS)
    assert all(isinstance(s, str) for s in single)
    assert batched == single
    # each equals an unpadded greedy generation from its prompt (which ends with the lone space)
    q = QUESTIONS[2]
    prompt = tok(_plain(q))["input_ids"]
    assert tok.convert_ids_to_tokens(prompt)[-1] == "Ġ"
    ids = torch.tensor([prompt])
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    text = clean_up_tokenization(tok.decode(out[0, len(prompt) :], skip_special_tokens=True))
    assert single[2] == text.split(tok.eos_token)[0].strip()


def test_clean_up_and_references(tiny_llama):
    """open-unlearning decodes with transformers 4's clean-up, and the ROUGE reference is the
    decoded full text without the decoded prompt."""
    assert clean_up_tokenization("a , b . c n't d 's e ?") == "a, b. cn't d's e?"
    _, tok = tiny_llama
    refs = references(tok, ["Who?", "Where?"], ["Mira Velsen , the poet .", "In Lisbon"])
    assert refs == ["Mira Velsen, the poet.", "In Lisbon"]


def test_rouge_scores_hand_computed():
    got = rouge_scores(["a cat runs", "Paris"], ["The cat was running", "Paris is the capital"])
    assert got["rouge"] == pytest.approx([0.5, 0.25])  # ROUGE-L recall
    assert got["rouge1_recall"] == pytest.approx([0.5, 0.25])
    assert got["rougeL_f1"][0] == pytest.approx(2 * (2 / 3 * 0.5) / (2 / 3 + 0.5))


# --------------------------------------------------------------------------------------------
# load_retain_reference
# --------------------------------------------------------------------------------------------

FORGET_Q = ["q1", "q2", "q3"]


def _write_ref(path, split="forget10", questions=FORGET_Q, r=(0.5, 1.0, 2.0)):
    write_json({"meta": {"forget_split": split}, "forget": {"question": list(questions), "truth_ratio": list(r)}}, path)
    return path


def test_load_retain_reference_ok(tmp_path):
    p = _write_ref(tmp_path / "tofu_eval.json")
    ref = load_retain_reference(p, "forget10", FORGET_Q)
    assert ref.forget_truth_ratio == [0.5, 1.0, 2.0] and ref.mia_auc is None
    assert load_retain_reference(str(p), "forget10", tuple(FORGET_Q)).forget_truth_ratio == [0.5, 1.0, 2.0]
    # with Min-K% scores of forget and holdout, the retain model's AUC for privleak
    data = json.loads(p.read_text())
    data["forget"]["min_k"] = [1.0, 2.0, 3.0]
    data["holdout"] = {"min_k": [2.5, 4.0]}
    write_json(data, p)
    assert load_retain_reference(p, "forget10", FORGET_Q).mia_auc == pytest.approx(5 / 6)


def test_load_retain_reference_other_tokenizer_or_template(tmp_path):
    p = _write_ref(tmp_path / "tofu_eval.json")
    data = json.loads(p.read_text())
    data["meta"].update(encoding="aaaa", template="plain")
    write_json(data, p)
    assert load_retain_reference(p, "forget10", FORGET_Q, fingerprint="aaaa").forget_truth_ratio == [0.5, 1.0, 2.0]
    with pytest.raises(
        ForgetfulError, match="another tokenizer or prompt template .*template plain, this evaluation chat"
    ):
        load_retain_reference(p, "forget10", FORGET_Q, fingerprint="bbbb", template="chat")


def test_load_retain_reference_open_unlearning_layout(tmp_path):
    """open-unlearning's TOFU_EVAL.json works as the retain reference (forget_truth_ratio, mia_min_k)."""
    p = tmp_path / "TOFU_EVAL.json"
    by_index = {str(i): {"score": r} for i, r in enumerate([0.5, 1.0, 2.0])}
    write_json(
        {"forget_truth_ratio": {"agg_value": 0.7, "value_by_index": by_index}, "mia_min_k": {"agg_value": 0.4}}, p
    )
    ref = load_retain_reference(p, "forget10", FORGET_Q)
    assert ref.forget_truth_ratio == [0.5, 1.0, 2.0] and ref.mia_auc == 0.4
    with pytest.raises(ForgetfulError, match="row counts do not match"):
        load_retain_reference(p, "forget10", FORGET_Q[:2])


def test_load_retain_reference_missing_file(tmp_path):
    with pytest.raises(ForgetfulError, match="retain results not found"):
        load_retain_reference(tmp_path / "nope.json", "forget10", FORGET_Q)


def test_load_retain_reference_wrong_split(tmp_path):
    p = _write_ref(tmp_path / "tofu_eval.json", split="forget05")
    with pytest.raises(ForgetfulError, match="are for forget05, but this evaluation is for forget10"):
        load_retain_reference(p, "forget10", FORGET_Q)


def test_load_retain_reference_row_count_mismatch(tmp_path):
    p = _write_ref(tmp_path / "tofu_eval.json", questions=FORGET_Q[:2], r=(0.5, 1.0))
    with pytest.raises(ForgetfulError, match="row counts do not match.*2 forget examples.*has 3"):
        load_retain_reference(p, "forget10", FORGET_Q)


def test_load_retain_reference_other_questions(tmp_path):
    p = _write_ref(tmp_path / "tofu_eval.json", questions=["q1", "q2", "other"])
    with pytest.raises(ForgetfulError, match="other forget questions"):
        load_retain_reference(p, "forget10", FORGET_Q)


@pytest.mark.parametrize("content", ["not json {", json.dumps({"meta": {}}), json.dumps([1, 2])])
def test_load_retain_reference_not_a_tofu_eval(tmp_path, content):
    p = tmp_path / "tofu_eval.json"
    p.write_text(content)
    with pytest.raises(ForgetfulError, match="is not a tofu_eval.json"):
        load_retain_reference(p, "forget10", FORGET_Q)


# --------------------------------------------------------------------------------------------
# The suite and the command
# --------------------------------------------------------------------------------------------

N_PERTURBED = {"forget": 5, "retain": 5, "real_authors": 3, "world_facts": 3}


def _all_finite(xs) -> bool:
    return bool(np.isfinite(np.asarray(xs, dtype=np.float64)).all())


def test_evaluate_tofu_embedded_shapes_and_summary(tiny_llama, tmp_path):
    model, tok = tiny_llama
    kw = {"data_dir": None, "num_authors": 4, "max_eval_examples": 3, "max_new_tokens": 5}
    per, summary = evaluate_tofu(model, tok, TofuEvalConfig(**kw), progress=False)
    assert per["meta"]["forget_split"] == "forget10" and per["meta"]["holdout_split"] == "holdout10"
    assert per["meta"]["source"] == "embedded" and per["meta"]["template"] == "plain"
    assert len(per["holdout"]["min_k"]) == 3 and len(per["forget"]["extraction_strength"]) == 3
    for name, n_pert in N_PERTURBED.items():
        s = per[name]
        for key in (
            "question",
            "answer",
            "generation",
            "rouge",
            "prob",
            "truth_ratio",
            "answer_nll",
            "paraphrased_nll",
            "perturbed_nll",
        ):
            assert len(s[key]) == 3, (name, key)
        assert all(len(row) == n_pert for row in s["perturbed_nll"])
        for key in ("rouge", "prob", "truth_ratio", "answer_nll", "paraphrased_nll"):
            assert _all_finite(s[key]), (name, key)
        assert _all_finite(s["perturbed_nll"])
        assert all(0.0 <= x <= 1.0 for x in s["rouge"] + s["prob"])
        assert all(x > 0 for x in s["truth_ratio"])
    assert {"model_utility", "forget_quality", *N_PERTURBED} <= set(summary)
    for name in N_PERTURBED:
        assert {"rouge", "prob", "truth_ratio"} <= set(summary[name])
        assert summary[name]["examples"] == 3
        assert all(math.isfinite(summary[name][m]) for m in ("rouge", "prob", "truth_ratio"))
    assert math.isfinite(summary["model_utility"]) and summary["model_utility"] >= 0
    assert summary["forget_quality"] is None  # no retain reference given
    # privleak against 0.5 without a retain model; extraction strength the mean of the per-example values
    assert summary["privleak_reference_auc"] == 0.5
    assert summary["privleak"] == pytest.approx((0.5 - summary["mia_auc"]) / (0.5 + 1e-10) * 100)
    assert summary["extraction_strength"] == pytest.approx(np.mean(per["forget"]["extraction_strength"]))
    # summary values are the aggregates of the per-example values
    assert summary["forget"]["truth_ratio"] == pytest.approx(truth_ratio_forget(per["forget"]["truth_ratio"]))
    assert summary["retain"]["truth_ratio"] == pytest.approx(truth_ratio_utility(per["retain"]["truth_ratio"]))
    assert summary["world_facts"]["prob"] == pytest.approx(np.mean(per["world_facts"]["prob"]))

    # against its own per-example results, forget quality is 1
    ref = tmp_path / "tofu_eval.json"
    write_json(per, ref)
    per2, summary2 = evaluate_tofu(model, tok, TofuEvalConfig(**kw), retain_eval=ref, progress=False)
    assert summary2["forget_quality"] == pytest.approx(1.0)
    assert summary2["privleak"] == pytest.approx(0.0, abs=1e-6)  # relative to its own AUC

    # open-unlearning's layout holds the same numbers
    ev, short = to_open_unlearning(per, summary)
    assert set(short) == {"extraction_strength", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio"} | {
        "model_utility",
        "privleak",
    }
    assert ev["forget_truth_ratio"]["value_by_index"]["2"]["score"] == per["forget"]["truth_ratio"][2]
    assert ev["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["avg_loss"] == per["forget"]["perturbed_nll"][0]
    assert ev["ra_Q_A_Prob_normalised"]["agg_value"] == summary["real_authors"]["prob"]
    assert ev["retain_Q_A_Prob"]["agg_value"] == pytest.approx(summary["retain"]["prob"])
    assert ev["mia_min_k"]["auc"] == summary["mia_auc"] and ev["forget_quality"]["agg_value"] is None
    assert short["model_utility"] == summary["model_utility"]
    # summarize recomputes the same aggregates from the per-example values
    assert summarize(per) == summary
    assert per2["forget"]["truth_ratio"] == pytest.approx(per["forget"]["truth_ratio"], rel=1e-5)


def test_evaluate_tofu_bad_forget_split(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ForgetfulError, match="forget split must be one of forget01, forget05, forget10"):
        TofuEvalConfig(forget_split="forget20", num_authors=4, max_eval_examples=2)


def test_cli_eval_tofu(tiny_model_dir, tmp_path):
    from forgetful.cli import main

    out = tmp_path / "out"
    rc = main(
        [
            "eval-tofu",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--num-authors",
            "4",
            "--max-examples",
            "3",
            "--max-new-tokens",
            "4",
        ]
    )
    assert rc == 0
    per = json.loads((out / "tofu_eval.json").read_text())
    summary = json.loads((out / "tofu_summary.json").read_text())
    assert per["meta"]["model"] == str(tiny_model_dir)
    assert len(per["forget"]["truth_ratio"]) == 3
    assert {"model_utility", "forget_quality", "forget", "retain", "real_authors", "world_facts"} <= set(summary)
    assert summary["forget_quality"] is None

    # and with the retain reference: forget quality 1.0 against itself
    out2 = tmp_path / "out2"
    rc = main(
        [
            "eval-tofu",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out2),
            "--num-authors",
            "4",
            "--max-examples",
            "3",
            "--max-new-tokens",
            "4",
            "--retain-eval",
            str(out / "tofu_eval.json"),
        ]
    )
    assert rc == 0
    assert json.loads((out2 / "tofu_summary.json").read_text())["forget_quality"] == pytest.approx(1.0)


def test_cli_eval_tofu_user_error_exits_2(tiny_model_dir, tmp_path, capsys):
    from forgetful.cli import main

    rc = main(
        [
            "eval-tofu",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path),
            "--num-authors",
            "4",
            "--max-examples",
            "2",
            "--max-new-tokens",
            "0",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "max_new_tokens and eval_batch_size must be positive" in err
    assert len(err.strip().splitlines()) == 1


def test_row_scores_equal_the_per_example_metrics():
    """The batched per-row scores of score_answers against the hand-tested one-example metrics, on
    rows of 0, 1, 2 and many tokens, ties among log-probabilities and runs of right predictions."""
    import torch

    from forgetful.tofu.metrics import extraction_strength, min_k_score
    from forgetful.tofu.scoring import row_scores

    gen = torch.Generator().manual_seed(0)
    lengths = [5, 0, 1, 2, 17, 3, 0, 40, 8]
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    lp = -torch.rand(len(rows), generator=gen) * 6
    lp[3:5] = -1.5  # ties
    correct = torch.rand(len(rows), generator=gen) < 0.6
    correct[-12:] = True  # a long run that ends the last row
    nll, min_k, extraction = row_scores(lp, correct, rows, len(lengths))
    start = 0
    for r, n in enumerate(lengths):
        tokens, right = lp[start : start + n].numpy(), correct[start : start + n].numpy()
        start += n
        if n == 0:
            assert np.isnan(nll[r].item())
        else:
            assert nll[r].item() == pytest.approx(-tokens.astype(np.float64).mean(), rel=1e-12)
        assert min_k[r].item() == pytest.approx(min_k_score(tokens[:-1]), rel=1e-6, abs=1e-12), r
        # extraction strength from the predictions: a right one equals its label
        labels = np.arange(n)
        predictions = np.where(right, labels, -1)
        assert extraction[r].item() == pytest.approx(extraction_strength(predictions[:-1], labels[:-1]), abs=1e-12), r
    assert extraction[len(lengths) - 1].item() > 0.25  # the run of right predictions shows


def test_summary_carries_model_utility_interval_and_one_line():
    """summarize adds model utility's 95% bootstrap interval over the questions, around the value;
    summary_line prints it with forget quality (n/a without a retain run) and privleak."""
    from forgetful.tofu.evaluation import summarize, summary_line

    rng = np.random.default_rng(0)

    def scored(n, forget=False):
        s = {k: rng.uniform(0.1, 0.9, n).tolist() for k in ("rouge", "prob", "truth_ratio")}
        return s | ({"min_k": rng.uniform(1, 3, n).tolist(), "extraction_strength": [0.5] * n} if forget else {})

    per = {"forget": scored(20, True), "retain": scored(40), "real_authors": scored(10), "world_facts": scored(12)}
    per["holdout"] = {"min_k": rng.uniform(1, 3, 20).tolist()}
    summary = summarize(per)
    low, high = summary["model_utility_ci"]
    assert 0 < low < summary["model_utility"] < high < 1
    line = summary_line(summary)
    assert line.startswith(
        f"model utility {summary['model_utility']:.4f} (95% over the questions: {low:.4f}-{high:.4f})"
    )
    assert "forget quality n/a (no --retain-eval); privleak " in line and line.endswith(
        f"forget ROUGE {np.mean(per['forget']['rouge']):.3f}"
    )
