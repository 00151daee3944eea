"""The token rules every part shares (forgetful.tokens): special tokens, the pad id, padding, and the
one prompt/answer encoding that training and evaluation both use."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from forgetful.data.tofu import encode_qa, encode_question, load_tofu_split
from forgetful.loss.tasks import prepare_dataset_for_training
from forgetful.tokens import encode_prompt_answer, overlap_mask, pad_sequences, pad_token_id, with_special_tokens


def test_special_tokens_where_the_tokenizer_has_them(tiny_llama):
    _, tok = tiny_llama
    assert with_special_tokens(tok, [7, 8]) == [tok.bos_token_id, 7, 8, tok.eos_token_id]
    assert with_special_tokens(tok, [7], bos=False) == [7, tok.eos_token_id]
    assert with_special_tokens(tok, [7], eos=False) == [tok.bos_token_id, 7]
    bare = SimpleNamespace(bos_token_id=None, eos_token_id=None)
    assert with_special_tokens(bare, [7, 8]) == [7, 8]


def test_pad_id_rule_in_order():
    tok = SimpleNamespace(pad_token_id=None, eos_token_id=5)
    model = SimpleNamespace(config=SimpleNamespace(pad_token_id=3))
    assert pad_token_id(SimpleNamespace(pad_token_id=9, eos_token_id=5), model) == 9
    assert pad_token_id(tok, model) == 3
    assert pad_token_id(tok) == 5
    assert pad_token_id() == 0


def test_right_padding_and_its_mask():
    ids, real = pad_sequences([[1, 2, 3], [4]], value=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert real.tolist() == [[True, True, True], [True, False, False]]
    ids, _ = pad_sequences([[1]], value=7, width=3)
    assert torch.equal(ids, torch.tensor([[1, 7, 7]]))


def test_prompt_answer_encoding_matches_a_manual_one(tiny_llama):
    _, tok = tiny_llama
    enc = encode_prompt_answer(tok, "Question: Who?\nAnswer:", "Mira Velsen.")
    prompt = [tok.bos_token_id] + tok("Question: Who?\nAnswer:", add_special_tokens=False)["input_ids"]
    answer = tok(" Mira Velsen.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.ids == prompt + answer and enc.prompt_length == len(prompt)
    assert enc.answer_text == " Mira Velsen."
    assert len(enc.offsets) == len(answer)
    # each answer token's offsets cover its own text; EOS sits at the end
    decoded = [enc.answer_text[s:e] for s, e in enc.offsets[:-1]]
    assert "".join(decoded) == enc.answer_text and enc.offsets[-1] == (len(enc.answer_text),) * 2
    short = encode_prompt_answer(tok, "Question: Who?\nAnswer:", "Mira Velsen.", max_length=3)
    assert short.ids == enc.ids[:3] and short.prompt_length == 3


def test_tofu_training_and_evaluation_encode_alike(tiny_llama):
    """The tofu task's rows are encode_qa's encoding (the TOFU encoding itself is tested in
    tests/data/test_tofu_encoding.py)."""
    _, tok = tiny_llama
    ds = prepare_dataset_for_training("tofu", tok, split="forget10", num_authors=5)
    rows = load_tofu_split(None, "forget10", num_authors=5)
    for row, ex in zip(rows, ds):
        enc = encode_qa(tok, row["question"], row["answer"])
        assert ex["input_ids"] == enc.ids and ex["attention_mask"] == enc.attention_mask
        assert ex["loss_mask"] == [0] * enc.prompt_length + [1] * (len(enc.ids) - enc.prompt_length)
        prompt = encode_question(tok, row["question"])
        assert prompt[:-1] == enc.ids[: enc.prompt_length - 1]  # up to the lone space of the plain template


@pytest.mark.parametrize(
    ("offsets", "spans", "expected"),
    [
        ([(0, 4), (4, 8), (8, 12)], [(5, 6)], [False, True, False]),
        ([(0, 4), (4, 8)], [(4, 4)], [False, False]),  # an empty span covers nothing
        ([(0, 4), (4, 8)], [(3, 5)], [True, True]),  # touching two tokens
        ([(0, 4), (4, 8)], [(4, 8), (0, 1)], [True, True]),
        ([(0, 4)], [], [False]),
        ([], [(0, 1)], []),
    ],
)
def test_overlap_mask(offsets, spans, expected):
    assert overlap_mask(offsets, spans).tolist() == expected
    assert overlap_mask(offsets, spans).dtype == np.bool_
