"""The TOFU evaluation suite (forgetful.tofu.evaluation): the batched scorers against unbatched
references, the retain-reference checks, the whole suite and the eval-tofu command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from forgetful.errors import ForgetfulError
from forgetful.reporting import write_json
from forgetful.tofu.evaluation import TofuEvalConfig, answer_nll, evaluate_tofu, generate_answers, load_retain_reference
from forgetful.tofu.metrics import truth_ratio_forget, truth_ratio_utility


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny models run ~100x faster on one thread than on two when the 2-core machine is
    shared (OpenMP threads spin-wait on each other); restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.mark.parametrize("backend", ["chunked", "auto"])
def test_answer_nll_is_the_same_with_every_cpu_loss_backend(tiny_llama, backend, monkeypatch):
    import forgetful.loss_kernels as lk

    monkeypatch.setattr(lk, "CHUNK_ELEMENTS", 2 * 400)  # 2 rows of logits per chunk
    model, tok = tiny_llama
    dense = answer_nll(model, tok, QUESTIONS, ANSWERS, batch_size=2)
    other = answer_nll(model, tok, QUESTIONS, ANSWERS, batch_size=2, loss_backend=backend)
    np.testing.assert_allclose(other, dense, rtol=1e-5, atol=1e-6)
    with pytest.raises(ForgetfulError, match="loss_backend='cce' runs only on a CUDA GPU"):
        answer_nll(model, tok, QUESTIONS, ANSWERS, loss_backend="cce")


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
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    assert single[2] == tok.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()


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
    kw = {"data_dir": None, "num_authors": 4, "max_examples": 3, "max_new_tokens": 5}
    per, summary = evaluate_tofu(model, tok, TofuEvalConfig(**kw), progress=False)
    assert per["meta"]["forget_split"] == "forget10"
    assert per["meta"]["source"] == "embedded"
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
    # summary values are the aggregates of the per-example values
    assert summary["forget"]["truth_ratio"] == pytest.approx(truth_ratio_forget(per["forget"]["truth_ratio"]))
    assert summary["retain"]["truth_ratio"] == pytest.approx(truth_ratio_utility(per["retain"]["truth_ratio"]))
    assert summary["world_facts"]["prob"] == pytest.approx(np.mean(per["world_facts"]["prob"]))

    # against its own per-example results, forget quality is 1
    ref = tmp_path / "tofu_eval.json"
    write_json(per, ref)
    per2, summary2 = evaluate_tofu(model, tok, TofuEvalConfig(**kw), retain_eval=ref, progress=False)
    assert summary2["forget_quality"] == pytest.approx(1.0)
    assert per2["forget"]["truth_ratio"] == pytest.approx(per["forget"]["truth_ratio"], rel=1e-5)


def test_evaluate_tofu_bad_forget_split(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ForgetfulError, match="forget split must be one of forget01, forget05, forget10"):
        TofuEvalConfig(forget_split="forget20", num_authors=4, max_examples=2)


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
    assert "max_new_tokens and batch_size must be positive" in err
    assert len(err.strip().splitlines()) == 1
