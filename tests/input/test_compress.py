"""The user's path: compress a prompt with a strategy or a trained policy, then generate from it."""

from __future__ import annotations

import pytest
import torch

from forgetful.errors import ForgetfulError
from forgetful.input.compress import compress, generate
from forgetful.input.generation import greedy_generate
from forgetful.input.policies import build_mask

PASSAGE = (
    "Mira Castellan was born in Lisbon. She writes long novels about the sea. Her father worked as a baker. "
    "The weather in the valley was mild that year. Her first book was The Silent River."
)


def test_compress_keeps_the_budget_and_the_question(tiny_llama):
    model, tok = tiny_llama
    short = compress(model, tok, PASSAGE, keep_ratio=0.5, strategy="recency@sentence")
    n = short.keep.shape[1]
    assert short.length == round(0.5 * n) == int(short.keep.sum())
    assert short.keep[0, 0] and short.strategy == "recency@sentence"
    # the kept tokens sit at their original positions, in order
    assert torch.equal(short.position_ids[0], short.keep[0].nonzero().flatten())
    assert short.next_position == n and short.text.endswith("The Silent River.")
    asked = compress(model, tok, PASSAGE, keep_ratio=0.25, strategy="lexical@sentence", question="Where was Mira born?")
    kept_text = asked.text
    assert "Where was Mira born?" in kept_text  # the question is protected: always kept
    assert "Lisbon" in kept_text  # lexical overlap finds the sentence that names Mira


def test_generate_from_a_compressed_prompt_equals_generating_from_its_tokens(tiny_llama):
    model, tok = tiny_llama
    policy = build_mask("residual", model, prior="recency", unit="sentence", layer=1, hidden_size=8)
    short = compress(model, tok, PASSAGE, keep_ratio=0.5, strategy=policy)
    text = generate(model, tok, short, max_new_tokens=5)
    new = greedy_generate(
        model,
        short.input_ids,
        torch.ones_like(short.input_ids),
        short.position_ids,
        torch.tensor([short.next_position]),
        max_new_tokens=5,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    assert text == tok.decode(new[0], skip_special_tokens=True).strip()
    with pytest.raises(ForgetfulError, match="max_new_tokens must be at least 1"):
        generate(model, tok, short, max_new_tokens=0)


def test_compress_refuses_what_it_cannot_do(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ForgetfulError, match="keep_ratio must lie in"):
        compress(model, tok, PASSAGE, keep_ratio=0)
    with pytest.raises(ForgetfulError, match="reads a target"):
        compress(model, tok, PASSAGE, keep_ratio=0.5, strategy="oracle@sentence")
    with pytest.raises(ForgetfulError, match="empty"):
        compress(model, tok, "", keep_ratio=0.5)
