"""The TOFU metrics (forgetful.tofu_eval) against hand computations, the batched scorers against
unbatched references, the retain-reference checks, the whole suite and the eval-tofu command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from forgetful.errors import ForgetfulError
from forgetful.reporting import write_json
from forgetful.tofu_eval import (
    EPS,
    answer_nll,
    evaluate_tofu,
    forget_quality,
    generate_answers,
    load_retain_reference,
    model_utility,
    normalised_probability,
    probability,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_forget,
    truth_ratio_utility,
)

LN2, LN4 = math.log(2.0), math.log(4.0)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny models run ~100x faster on one thread than on two when the 2-core machine is
    shared (OpenMP threads spin-wait on each other); restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# ROUGE-L recall
# --------------------------------------------------------------------------------------------


def test_rouge_l_recall_hand_computed_with_stemming():
    # rouge-score lowercases, keeps alphanumerics and Porter-stems tokens longer than 3 chars:
    # reference "The cat was running" -> [the, cat, was, run]; generation "a cat runs" -> [a, cat, run].
    # LCS = [cat, run] = 2 tokens; recall = 2 / 4 (without stemming it would be 1 / 4).
    assert rouge_l_recall(["a cat runs"], ["The cat was running"]) == [pytest.approx(0.5)]
    # "running"/"runs" both stem to "run"
    assert rouge_l_recall(["running"], ["run"]) == [pytest.approx(1.0)]
    assert rouge_l_recall(["runs"], ["running"]) == [pytest.approx(1.0)]


def test_rouge_l_recall_is_recall_not_precision_and_keeps_order():
    # generation [cat, run] against reference [the, cat, was, run]: recall 2/4, precision would be 1
    gens = ["cat running", "Paris", "", "fast the dog"]
    refs = ["The cat was running", "Paris is the capital of France", "anything here", "the dog was fast"]
    # 3: ref [the, dog, was, fast], gen [fast, the, dog]: LCS [the, dog] = 2 -> 2/4
    expected = [2 / 4, 1 / 6, 0.0, 2 / 4]
    assert rouge_l_recall(gens, refs) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Probabilities and truth ratios
# --------------------------------------------------------------------------------------------


def test_probability_is_exp_minus_average_nll():
    np.testing.assert_allclose(probability(np.array([0.0, LN2, LN4])), [1.0, 0.5, 0.25], rtol=1e-12)
    assert probability([LN2]).dtype == np.float64


def test_normalised_probability_hand_computed():
    true_nll = np.array([LN2, 0.0])
    pert_nll = np.array([[LN4, LN4, LN4], [LN2, LN2, LN4]])
    # row 0: 0.5 / (0.5 + 0.75); row 1: 1 / (1 + 0.5 + 0.5 + 0.25)
    expected = np.array([0.5 / (0.5 + 0.75 + EPS), 1.0 / (1.0 + 1.25 + EPS)])
    got = normalised_probability(true_nll, pert_nll)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(got, [0.4, 1 / 2.25], rtol=1e-9)
    assert EPS == 1e-10
    # with every probability ~0 the eps keeps it finite
    assert np.isfinite(normalised_probability(np.array([1e4]), np.array([[1e4, 1e4]]))).all()


def test_truth_ratio_hand_computed():
    # correct p = 0.5; perturbed p = 0.25, 0.25, 1 -> geomean = 0.0625 ** (1/3)
    correct = np.array([LN2])
    pert = np.array([[LN4, LN4, 0.0]])
    geomean = (0.25 * 0.25 * 1.0) ** (1 / 3)
    np.testing.assert_allclose(truth_ratio(correct, pert), [geomean / 0.5], rtol=1e-9)
    np.testing.assert_allclose(truth_ratio(correct, pert), [math.exp(LN2 - 2 * LN4 / 3)], rtol=1e-9)


def test_truth_ratio_is_exp_of_nll_difference_per_row():
    rng = np.random.default_rng(0)
    correct = rng.uniform(0.1, 4.0, size=7)
    pert = rng.uniform(0.1, 4.0, size=(7, 5))
    np.testing.assert_allclose(truth_ratio(correct, pert), np.exp(correct - pert.mean(-1)), rtol=1e-8)
    # equal likelihoods -> R = 1
    np.testing.assert_allclose(truth_ratio(np.full(3, 1.3), np.full((3, 5), 1.3)), 1.0, rtol=1e-8)


def test_truth_ratio_forget_mean_of_min_r_and_inverse():
    # min(R, 1/R) = 0.5, 0.5, 1 -> mean 2/3
    assert truth_ratio_forget(np.array([0.5, 2.0, 1.0])) == pytest.approx(2 / 3, rel=1e-8)
    assert truth_ratio_forget([0.25]) == pytest.approx(0.25, rel=1e-8)
    assert truth_ratio_forget([4.0]) == pytest.approx(0.25, rel=1e-8)


def test_truth_ratio_utility_mean_of_clipped_one_minus_r():
    # max(0, 1 - R) = 0.5, 0, 0.75 -> mean 1.25 / 3
    assert truth_ratio_utility(np.array([0.5, 2.0, 0.25])) == pytest.approx(1.25 / 3, rel=1e-12)
    assert truth_ratio_utility([1.0, 3.0]) == 0.0


# --------------------------------------------------------------------------------------------
# Forget quality and model utility
# --------------------------------------------------------------------------------------------


def test_forget_quality_identical_is_one():
    r = np.random.default_rng(0).lognormal(size=40)
    assert forget_quality(r, r) == pytest.approx(1.0)
    assert forget_quality(list(r), r.copy()) == pytest.approx(1.0)


def test_forget_quality_clearly_different_is_small_and_matches_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 1.0, 100), rng.normal(3.0, 1.0, 100)
    fq = forget_quality(a, b)
    assert fq < 0.01
    assert fq == pytest.approx(ks_2samp(a, b).pvalue)
    c, d = rng.normal(0.0, 1.0, 30), rng.normal(0.2, 1.0, 25)
    assert forget_quality(c, d) == pytest.approx(ks_2samp(c, d).pvalue)
    assert isinstance(fq, float)


def _utility_summary(values):
    it = iter(values)
    return {s: {m: next(it) for m in ("prob", "rouge", "truth_ratio")} for s in ("retain", "real_authors", "world_facts")}


def test_model_utility_harmonic_mean_of_nine():
    values = [0.9, 0.5, 0.3, 0.8, 0.6, 0.2, 0.7, 0.4, 0.1]
    summary = _utility_summary(values)
    summary["forget"] = {"prob": 0.0, "rouge": 0.0, "truth_ratio": 0.0}  # the forget set does not count
    expected = 9 / sum(1 / v for v in values)
    assert model_utility(summary) == pytest.approx(expected, rel=1e-12)
    assert model_utility(_utility_summary([0.5] * 9)) == pytest.approx(0.5)


def test_model_utility_zero_when_any_is_zero():
    values = [0.9, 0.5, 0.3, 0.8, 0.0, 0.2, 0.7, 0.4, 0.1]
    assert model_utility(_utility_summary(values)) == 0.0


# --------------------------------------------------------------------------------------------
# answer_nll and generate_answers on a tiny model
# --------------------------------------------------------------------------------------------

QUESTIONS = ["Where was Mira born?", "q", "What did the father of Tomas Velsen do for a living?",
             "Who wrote Hamlet?", "What is the capital of Kenya?"]
ANSWERS = ["Mira was born in Lisbon.", "a", "The father of Tomas Velsen worked as a pilot.",
           "William Shakespeare", "Nairobi"]


@torch.no_grad()
def _manual_answer_nll(model, tok, question: str, answer: str) -> float:
    prompt = [tok.bos_token_id] + tok(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
    ans = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + ans])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    nll = [-logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1])]
    assert len(nll) == len(ans)  # the answer tokens and EOS
    return float(np.mean(nll))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_answer_nll_matches_manual_full_logits(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    was_training = model.training
    got = answer_nll(model, tok, ["q"], ["a"], batch_size=1)
    model.eval()
    expected = _manual_answer_nll(model, tok, "q", "a")
    model.train(was_training)
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert model.training == was_training  # the mode is restored


def test_answer_nll_independent_of_batch_size_and_padding(tiny_llama):
    model, tok = tiny_llama
    model.eval()
    manual = [_manual_answer_nll(model, tok, q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    one = answer_nll(model, tok, QUESTIONS, ANSWERS, batch_size=1)
    two = answer_nll(model, tok, QUESTIONS, ANSWERS, batch_size=2)
    allb = answer_nll(model, tok, QUESTIONS, ANSWERS, batch_size=32)
    np.testing.assert_allclose(one, manual, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(allb, one, rtol=1e-4, atol=1e-5)
    # results come back in input order, whatever the length sorting did
    rev = answer_nll(model, tok, QUESTIONS[::-1], ANSWERS[::-1], batch_size=3)
    np.testing.assert_allclose(rev[::-1], one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_generate_answers_batched_equals_one_by_one(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    single = generate_answers(model, tok, QUESTIONS, max_new_tokens=6, batch_size=1)
    batched = generate_answers(model, tok, QUESTIONS, max_new_tokens=6, batch_size=8)
    assert len(single) == len(QUESTIONS)
    assert all(isinstance(s, str) for s in single)
    assert batched == single
    # each equals an unpadded greedy generation of its own prompt
    q = QUESTIONS[2]
    prompt = [tok.bos_token_id] + tok(f"Question: {q}\nAnswer:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt])
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert single[2] == tok.decode(out[0, len(prompt):], skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------
# load_retain_reference
# --------------------------------------------------------------------------------------------

FORGET_Q = ["q1", "q2", "q3"]


def _write_ref(path, split="forget10", questions=FORGET_Q, r=(0.5, 1.0, 2.0)):
    write_json({"meta": {"forget_split": split}, "forget": {"question": list(questions), "truth_ratio": list(r)}}, path)
    return path


def test_load_retain_reference_ok(tmp_path):
    p = _write_ref(tmp_path / "tofu_eval.json")
    assert load_retain_reference(p, "forget10", FORGET_Q) == [0.5, 1.0, 2.0]
    assert load_retain_reference(str(p), "forget10", tuple(FORGET_Q)) == [0.5, 1.0, 2.0]


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
    kw = {"source": None, "num_authors": 4, "max_examples": 3, "max_new_tokens": 5, "progress": False}
    per, summary = evaluate_tofu(model, tok, **kw)
    assert per["meta"]["forget_split"] == "forget10"
    assert per["meta"]["source"] == "embedded"
    for name, n_pert in N_PERTURBED.items():
        s = per[name]
        for key in ("question", "answer", "generation", "rouge", "prob", "truth_ratio", "answer_nll",
                    "paraphrased_nll", "perturbed_nll"):
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
    # summary values are the aggregates of the per-example values
    assert summary["forget"]["truth_ratio"] == pytest.approx(truth_ratio_forget(per["forget"]["truth_ratio"]))
    assert summary["retain"]["truth_ratio"] == pytest.approx(truth_ratio_utility(per["retain"]["truth_ratio"]))
    assert summary["world_facts"]["prob"] == pytest.approx(np.mean(per["world_facts"]["prob"]))

    # against its own per-example results, forget quality is 1
    ref = tmp_path / "tofu_eval.json"
    write_json(per, ref)
    per2, summary2 = evaluate_tofu(model, tok, retain_eval=ref, **kw)
    assert summary2["forget_quality"] == pytest.approx(1.0)
    assert per2["forget"]["truth_ratio"] == pytest.approx(per["forget"]["truth_ratio"], rel=1e-5)


def test_evaluate_tofu_bad_forget_split(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ForgetfulError, match="forget split must be one of forget01, forget05, forget10"):
        evaluate_tofu(model, tok, forget_split="forget20", num_authors=4, max_examples=2, progress=False)


def test_cli_eval_tofu(tiny_model_dir, tmp_path):
    from forgetful.cli import main

    out = tmp_path / "out"
    rc = main(["eval-tofu", "--model", str(tiny_model_dir), "--out", str(out), "--num-authors", "4",
               "--max-examples", "3", "--max-new-tokens", "4"])
    assert rc == 0
    per = json.loads((out / "tofu_eval.json").read_text())
    summary = json.loads((out / "tofu_summary.json").read_text())
    assert per["meta"]["model"] == str(tiny_model_dir)
    assert len(per["forget"]["truth_ratio"]) == 3
    assert {"model_utility", "forget_quality", "forget", "retain", "real_authors", "world_facts"} <= set(summary)
    assert summary["forget_quality"] is None

    # and with the retain reference: forget quality 1.0 against itself
    out2 = tmp_path / "out2"
    rc = main(["eval-tofu", "--model", str(tiny_model_dir), "--out", str(out2), "--num-authors", "4",
               "--max-examples", "3", "--max-new-tokens", "4", "--retain-eval", str(out / "tofu_eval.json")])
    assert rc == 0
    assert json.loads((out2 / "tofu_summary.json").read_text())["forget_quality"] == pytest.approx(1.0)


def test_cli_eval_tofu_user_error_exits_2(tiny_model_dir, tmp_path, capsys):
    from forgetful.cli import main

    rc = main(["eval-tofu", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--num-authors", "4",
               "--max-examples", "2", "--max-new-tokens", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "max_new_tokens and batch_size must be positive" in err
    assert len(err.strip().splitlines()) == 1
