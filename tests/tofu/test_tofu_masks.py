"""Masks at matched shares of the forget answers' tokens (forgetful.loss.share_masks, the tofu task's
``share``): surprise masks at exact shares, with the recurrences of entity words, against a hand
example; fact subsets, random and goldfish at a share; the surprise scores written by the
experiment's scorer and read back by the task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from forgetful.data.tofu import TofuTemplate, encode_qa, forget_keys, load_tofu_split
from forgetful.errors import ForgetfulError
from forgetful.loss.masks import fact_spans, span_mask
from forgetful.loss.share_masks import (
    ForgetAnswer,
    answer_token_nll,
    fact_subset_masks,
    goldfish_k,
    masked_count,
    random_share_masks,
    surprise_masks,
)
from forgetful.loss.tasks import prepare_dataset_for_training
from forgetful.loss.trainer import SelectiveLossCollator
from forgetful.tofu.surprise import surprise_scores_match, write_surprise_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _words(text: str, nll: list[float]) -> ForgetAnswer:
    """One token per word (offsets of each ``\\w+`` run), plus EOS (an empty span at the end)."""
    import re

    offsets = [m.span() for m in re.finditer(r"\w+", text)] + [(len(text), len(text))]
    assert len(offsets) == len(nll)
    return ForgetAnswer(text, offsets, nll)


def test_surprise_masks_by_hand():
    # "Zorba" is an entity word (capitalised, never lower case); "The" is not ("the" occurs); "1958" has digits
    a = _words("The book by Zorba won in 1958", [0.1, 0.2, 0.3, 5.0, 0.4, 0.5, 0.6, 0.05])
    b = _words("Zorba wrote the book", [0.2, 0.9, 0.1, 0.3, 0.05])
    c = _words("In 1958 the Zorba prize", [0.7, 0.8, 0.2, 0.1, 0.3, 0.05])
    answers = [a, b, c]  # 8 + 5 + 6 = 19 tokens
    # share 4/19: the most surprising token is Zorba in a (5.0): Zorba is masked in a, b and c (3 tokens),
    # the next prefix (+ "wrote", 0.9) makes 4 and fits; the next (+ "1958" in c, 0.8) would mask 1958 in a too (6)
    masks = surprise_masks(answers, 4 / 19)
    assert [m.tolist() for m in masks] == [[1, 1, 1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 1, 1]]
    # share 5/19: the prefix of 3 (with 1958 in a and c) makes 6 > 5, so the largest fitting prefix is 2 (4
    # tokens) and the next token alone fills the fifth: 1958 in c (0.8), not its recurrence in a
    masks = surprise_masks(answers, 5 / 19)
    assert [m.tolist() for m in masks] == [[1, 1, 1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1, 1]]
    # a non-entity word is not propagated: "the" (0.9 in b made the top) masks only itself
    d = _words("the cat saw the dog", [0.1, 0.2, 0.3, 0.9, 0.4, 0.0])
    assert surprise_masks([d], 1 / 6)[0].tolist() == [1, 1, 1, 0, 1, 1]
    with pytest.raises(ForgetfulError, match="one NLL per scored token"):
        surprise_masks([ForgetAnswer("x", [(0, 1)], [0.1, 0.2])], 0.5)


def test_share_masks_on_the_embedded_forget_answers(tiny_llama):
    """Every builder at 10%, 25%, 50% of the forget answers' tokens: surprise and random mask
    exactly round(share x tokens); fact subsets mask only fact tokens, exactly, while the facts
    have tokens enough; goldfish's k is the nearest 1 / share."""
    model, tok = tiny_llama
    rows = prepare_dataset_for_training("tofu", tok, split="forget10", num_authors=10)
    qa = load_tofu_split(None, "forget10", num_authors=10)
    enc = [encode_qa(tok, r["question"], r["answer"], template=TofuTemplate()) for r in qa]
    nll = answer_token_nll(model, rows, tok.pad_token_id, batch_size=8)
    answers = [ForgetAnswer(e.answer_text, e.offsets, v) for e, v in zip(enc, nll)]
    total = sum(len(a.offsets) for a in answers)
    fact = np.concatenate([1 - span_mask(a.offsets, fact_spans(a.text)) for a in answers]).astype(bool)
    assert total == sum(sum(m) for m in rows["loss_mask"]) and 0 < fact.sum() < total
    for share in (0.1, 0.25, 0.5):
        target = masked_count(total, share)
        for masks in (surprise_masks(answers, share), random_share_masks(answers, share, seed=3)):
            assert [len(m) for m in masks] == [len(a.offsets) for a in answers]
            assert int(sum((m == 0).sum() for m in masks)) == target
        facts = np.concatenate(fact_subset_masks(answers, share, seed=3)) == 0
        assert facts.sum() == min(target, fact.sum()) and not (facts & ~fact).any()
    # the most surprising token is always masked, and the masked tokens are the more surprising ones
    flat = np.concatenate(nll)
    for share in (0.1, 0.25):
        masked = np.concatenate(surprise_masks(answers, share)) == 0
        assert masked[flat.argmax()] and flat[masked].mean() > flat[~masked].mean()
    assert (goldfish_k(0.1), goldfish_k(0.25), goldfish_k(0.5), goldfish_k(0.3)) == (10, 4, 2, 3)
    # random subsets differ by seed, fact subsets too, surprise is deterministic
    assert not np.array_equal(
        np.concatenate(random_share_masks(answers, 0.25, 0)), np.concatenate(random_share_masks(answers, 0.25, 1))
    )
    assert np.array_equal(np.concatenate(surprise_masks(answers, 0.25)), np.concatenate(surprise_masks(answers, 0.25)))


def test_answer_token_nll_by_hand(tiny_llama):
    model, tok = tiny_llama
    rows = prepare_dataset_for_training("tofu", tok, split="forget10", num_authors=10).select(range(5))
    nll = answer_token_nll(model, rows, tok.pad_token_id, batch_size=2)
    batch = SelectiveLossCollator(tok.pad_token_id)(rows.to_list())
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    for i, row in enumerate(nll):
        keep = batch["labels"][i, 1:] != -100
        assert np.allclose(row, ce[i][keep].numpy(), rtol=1e-5, atol=1e-6)


def test_the_tofu_task_at_a_share_and_the_surprise_scores_file(tiny_llama, tmp_path):
    """The task masks the forget rows of full at the share (the rest trained whole), reading the
    surprise scores the experiment's scorer writes; the scores file is matched by its meta; a
    surprise run without scores, a share on a strategy without one, are refused."""
    model, tok = tiny_llama
    common = dict(num_authors=10, forget_split="forget10", seed=0)
    path = write_surprise_scores(model, tok, tmp_path / "s.json", {**common, "source": None}, {"model": "tiny"})
    assert surprise_scores_match(path, {"model": "tiny"}) and not surprise_scores_match(path, {"model": "other"})
    assert len(json.loads(path.read_text())["rows"]) == 20  # forget10 of 10 authors: one author
    plain = prepare_dataset_for_training("tofu", tok, split="full", **common)
    forget = forget_keys(None, "forget10", num_authors=10, seed=0)
    rows = load_tofu_split(None, "full", num_authors=10, seed=0)
    is_forget = np.array([(r["question"], r["answer"]) in forget for r in rows])
    answer_tokens = np.array([sum(m) for m in plain["loss_mask"]])
    for strategy in ("surprise", "random", "forget_facts"):
        ds = prepare_dataset_for_training(
            "tofu", tok, split="full", strategy=strategy, share=0.25, surprise_scores=str(path), **common
        )
        trained = np.array([sum(m) for m in ds["loss_mask"]])
        assert (trained[~is_forget] == answer_tokens[~is_forget]).all()  # only the forget rows are masked
        masked = int((answer_tokens - trained)[is_forget].sum())
        expected = masked_count(int(answer_tokens[is_forget].sum()), 0.25)
        assert masked == expected if strategy != "forget_facts" else 0 < masked <= expected, strategy
    goldfish = prepare_dataset_for_training("tofu", tok, split="full", strategy="goldfish", share=0.5, **common)
    k2 = prepare_dataset_for_training("tofu", tok, split="full", strategy="goldfish", k=2, **common)
    assert goldfish["loss_mask"] == k2["loss_mask"]  # share 0.5 is goldfish k = 2
    with pytest.raises(ForgetfulError, match="the surprise strategy needs a share and surprise_scores"):
        prepare_dataset_for_training("tofu", tok, split="full", strategy="surprise", share=0.25, **common)
    with pytest.raises(ForgetfulError, match="strategy 'forget_answers' takes no share"):
        prepare_dataset_for_training("tofu", tok, split="full", strategy="forget_answers", share=0.25, **common)
