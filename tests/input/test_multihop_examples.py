"""Multi-hop examples as input-forgetting rows: the task's units are the passage's sentences, the
fact mask lands on exactly the two hop sentences, the question is protected, and the target is
the answer entity + EOS (through the chat template on the real model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forgetful.data.multihop import MultihopOptions, multihop_rows
from forgetful.errors import ForgetfulError
from forgetful.input.examples import ForgetCollator, multihop_examples, tofu_qa_examples

COLUMNS = {"context_ids", "target_ids", "protect_mask", "fact_mask", "unit_ids", "group", "answer", "sentence_ids"}


def check_alignment(ds, rows, tok, cue=True):
    """Every row's masks line up with the passage's sentences, decoded back from the tokens."""
    for ex, row in zip(ds, rows, strict=True):
        ids, units = np.array(ex["context_ids"]), np.array(ex["unit_ids"])
        protect, facts = np.array(ex["protect_mask"], bool), np.array(ex["fact_mask"], bool)
        assert len(ids) == len(units) == len(protect) == len(facts) == len(ex["sentence_ids"])
        assert ex["group"] == row.group and ex["answer"] == row.answer and ex["hop_units"] == list(row.hops)
        # one unit per sentence, in reading order, each decoding to its sentence
        assert sorted(set(units[units >= 0].tolist())) == list(range(len(row.sentences)))
        assert (np.diff(units[units >= 0]) >= 0).all()
        for j, sentence in enumerate(row.sentences):
            assert tok.decode(ids[units == j].tolist()).strip() == sentence
        # the fact mask is exactly the tokens of the two hop sentences
        assert (facts == np.isin(units, row.hops)).all() and facts.any()
        hop_text = tok.decode(ids[facts].tolist())
        assert row.sentences[row.hops[0]] in hop_text and row.sentences[row.hops[1]] in hop_text
        # the question (and anything around the passage) is protected; the passage is not
        assert not protect[units >= 0].any()
        assert row.question in tok.decode(ids[protect].tolist())
        cued = tok.decode(ids.tolist()).endswith(row.cue)
        assert cued == cue  # the answer's opening ends the context when asked for, protected like the question
        assert protect[-len(tok(row.cue, add_special_tokens=False)["input_ids"]) :].all()
        assert tok.decode(ids[~protect].tolist()).strip() == row.passage
        assert protect[0]  # token 0 (BOS / the template's first token) is outside the passage
        tgt = ex["target_ids"]
        assert tgt[-1] == tok.eos_token_id and tok.decode(tgt[:-1]).strip() == row.answer


def test_columns_line_up_with_the_sentences(tiny_llama):
    _, tok = tiny_llama
    assert not tok.chat_template
    ds = multihop_examples(tok, part="eval", n=6, seed=2)
    assert set(ds.column_names) >= COLUMNS and len(ds) == 6
    rows = multihop_rows(6, part="eval", seed=2)
    check_alignment(ds, rows, tok)
    # without a chat template: "<passage>\nQuestion: <q>\nAnswer: <cue>" after BOS, target " <answer>"
    ex, row = ds[0], rows[0]
    assert ex["context_ids"][0] == tok.bos_token_id
    assert tok.decode(ex["context_ids"][1:]) == f"{row.passage}\nQuestion: {row.question}\nAnswer: {row.cue}"
    assert ex["target_ids"][:-1] == tok(" " + row.answer, add_special_tokens=False)["input_ids"]
    # without the cue the answer follows "Answer:" directly; the passage's tokens are the same
    bare = multihop_examples(tok, part="eval", n=6, seed=2, options=MultihopOptions(answer_cue=False))
    check_alignment(bare, rows, tok, cue=False)
    assert tok.decode(bare[0]["context_ids"][1:]) == f"{row.passage}\nQuestion: {row.question}\nAnswer:"
    assert bare[0]["target_ids"] == ex["target_ids"]
    assert bare[0]["unit_ids"] == ex["unit_ids"][: len(bare[0]["unit_ids"])]


def test_same_columns_as_tofu_qa(tiny_llama):
    _, tok = tiny_llama
    tofu = tofu_qa_examples(tok, None, part="eval", questions_per_author=1, num_authors=24)
    ds = multihop_examples(tok, part="eval", n=2)
    assert set(tofu.column_names) <= set(ds.column_names)
    for column in tofu.column_names:
        assert ds.features[column] == tofu.features[column], column


def test_examples_are_a_pure_function_of_the_seed_and_the_options(tiny_llama):
    _, tok = tiny_llama
    small = MultihopOptions(distractor_chains=2, filler=1, facts_per_author=2)
    a = multihop_examples(tok, part="train", n=4, seed=1, options=small)
    assert a.to_dict() == multihop_examples(tok, part="train", n=4, seed=1, options=small).to_dict()
    assert a["context_ids"] != multihop_examples(tok, part="train", n=4, seed=2, options=small)["context_ids"]
    rows = multihop_rows(4, part="train", seed=1, options=small)
    assert all(len(r.sentences) == 3 * 3 + 1 for r in rows)
    check_alignment(a, rows, tok)


def test_the_collator_batches_the_masks(tiny_llama):
    _, tok = tiny_llama
    ds = multihop_examples(tok, part="eval", n=3)
    batch = ForgetCollator(tok.pad_token_id)([ds[i] for i in range(3)])
    assert batch.fact_mask.shape == batch.protect_mask.shape == batch.unit_ids.shape == batch.context_ids.shape
    assert batch.group.tolist() == ds["group"] and batch.answers == tuple(ds["answer"])
    hops = torch.tensor(ds["hop_units"])
    in_hops = (batch.unit_ids == hops[:, :1]) | (batch.unit_ids == hops[:, 1:])
    assert torch.equal(in_hops, batch.fact_mask)
    assert torch.equal(batch.units("task"), batch.unit_ids)


def test_bad_input_fails_with_the_fix(tiny_llama):
    _, tok = tiny_llama
    with pytest.raises(ForgetfulError, match="part must be train or eval"):
        multihop_examples(tok, part="held")
    with pytest.raises(ForgetfulError, match="n >= 1 rows"):
        multihop_examples(tok, n=0)
    with pytest.raises(ForgetfulError, match="distractor_chains must be a non-negative integer"):
        multihop_examples(tok, options=MultihopOptions(distractor_chains=-1))


@pytest.mark.slow
def test_the_real_model_reads_it_through_its_chat_template():
    """SmolLM2-135M-Instruct's tokenizer: the passage and question sit in the user turn, the cue opens
    the assistant's turn and the target continues it (" <answer><|im_end|>"; without the cue the bare
    answer starts the turn), and the default passages are 300-600 tokens long."""
    from forgetful.models import load_model

    try:
        _, tok = load_model("smollm2-135m", dtype=torch.float32)
    except (ForgetfulError, OSError) as exc:
        pytest.skip(f"the real model cannot be loaded here: {exc}")
    assert tok.chat_template
    ds = multihop_examples(tok, part="eval", n=8)
    rows = multihop_rows(8, part="eval")
    check_alignment(ds, rows, tok)
    text = tok.decode(ds[0]["context_ids"])
    assert f"<|im_start|>user\n{rows[0].passage}\n\nQuestion: {rows[0].question}<|im_end|>" in text
    assert text.endswith(f"<|im_start|>assistant\n{rows[0].cue}")
    assert ds[0]["target_ids"] == tok(" " + rows[0].answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    bare = multihop_examples(tok, part="eval", n=8, options=MultihopOptions(answer_cue=False))
    check_alignment(bare, rows, tok, cue=False)
    assert tok.decode(bare[0]["context_ids"]).endswith("<|im_start|>assistant\n")
    assert bare[0]["target_ids"] == tok(rows[0].answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    passage_tokens = [int((1 - np.array(m)).sum()) for m in ds["protect_mask"]]
    assert min(passage_tokens) >= 300 and max(passage_tokens) <= 600
