"""The TOFU encoding (forgetful.data.tofu.encode_qa / encode_question), token by token, as
open-unlearning's ``preprocess_chat_instance`` builds it: the chat template (system prompt,
date_string, no special tokens added, a second EOS after ChatML's ``<|im_end|>\\n``) and the plain
template (``"Question: q\\nAnswer: "`` with its lone trailing space token, the first answer token
unscored), the unscored prefix by prompt length, the attention mask ``token != pad``."""

from __future__ import annotations

import copy

import pytest

from forgetful.data.tofu import TofuTemplate, encode_qa, encode_question
from forgetful.errors import ForgetfulError

# A ChatML-like template over the tiny tokenizer's special tokens; it prints date_string when given.
CHAT_TEMPLATE = (
    "{% if date_string %}<|bos|>date\n{{ date_string }}<|eos|>\n{% endif %}"
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)
Q, A = "Who wrote X?", "Jane Doe wrote it."


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return tiny_llama[1]


@pytest.fixture(scope="module")
def chat_tok(tok):
    """The tiny tokenizer with a chat template and pad = EOS (as SmolLM2-Instruct has it)."""
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    t.pad_token = t.eos_token
    return t


def _tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


# --------------------------------------------------------------------------------------------
# Plain template
# --------------------------------------------------------------------------------------------


def test_plain_encoding_token_by_token(tok):
    enc = encode_qa(tok, Q, A, template=TofuTemplate(kind="plain"))
    full = tok("Question: Who wrote X?\nAnswer: Jane Doe wrote it.")["input_ids"]
    prompt = tok("Question: Who wrote X?\nAnswer: ")["input_ids"]
    assert enc.ids == full + [tok.eos_token_id]  # EOS appended, no BOS (the tokenizer adds none)
    assert enc.prompt_length == len(prompt)
    # the prompt ends with a lone space token, which the full text merges into "ĠJ...": the first
    # answer token sits at prompt_length - 1 and is unscored; scoring starts at the second one
    assert _tokens(tok, prompt)[-1] == "Ġ"
    assert prompt[:-1] == full[: len(prompt) - 1]
    first = _tokens(tok, enc.ids)[len(prompt) - 1]
    assert first.startswith("ĠJ") and first != "Ġ"
    assert tok.decode(enc.ids[enc.prompt_length :]) == tok.decode(full[len(prompt) :]) + tok.eos_token
    # generation starts after the lone space
    assert encode_question(tok, Q, template=TofuTemplate(kind="plain")) == prompt
    # offsets of the scored tokens, relative to the answer; EOS sits at its end
    scored = enc.offsets
    assert len(scored) == len(enc.ids) - enc.prompt_length
    assert "".join(A[s:e] for s, e in scored[:-1]).strip() == A[scored[0][0] :].strip()
    assert scored[-1] == (len(A), len(A))
    assert enc.attention_mask == [1] * len(enc.ids)  # pad != EOS: nothing masked
    assert enc.answer_text == A


def test_plain_template_is_the_default_without_a_chat_template(tok):
    assert encode_qa(tok, Q, A).ids == encode_qa(tok, Q, A, template=TofuTemplate(kind="plain")).ids


def test_plain_truncation_then_eos(tok):
    """Full text and prompt are truncated apart, then EOS is appended (max_length + 1 tokens)."""
    enc = encode_qa(tok, Q, A, max_length=6, template=TofuTemplate(kind="plain"))
    full = tok("Question: Who wrote X?\nAnswer: Jane Doe wrote it.")["input_ids"]
    assert enc.ids == full[:6] + [tok.eos_token_id]
    assert enc.prompt_length == 6
    assert encode_question(tok, Q, max_length=6) == full[:6]


def test_plain_no_second_eos_when_the_text_ends_with_it(tok):
    enc = encode_qa(tok, Q, "It ends here.<|eos|>", template=TofuTemplate(kind="plain"))
    assert enc.ids[-1] == tok.eos_token_id and enc.ids[-2] != tok.eos_token_id


# --------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------


def test_chat_encoding_token_by_token(chat_tok):
    t = chat_tok
    enc = encode_qa(t, Q, A, template=TofuTemplate(kind="chat"))
    prompt_text = (
        "<|bos|>date\n10 Apr 2025<|eos|>\n<|bos|>system\nYou are a helpful assistant.<|eos|>\n"
        "<|bos|>user\nWho wrote X?<|eos|>\n<|bos|>assistant\n"
    )
    full_text = prompt_text + "Jane Doe wrote it.<|eos|>\n"
    prompt = t(prompt_text, add_special_tokens=False)["input_ids"]
    full = t(full_text, add_special_tokens=False)["input_ids"]
    assert enc.ids == full + [t.eos_token_id]  # ... <|eos|> Ċ <|eos|>: a second EOS
    assert _tokens(t, enc.ids[-3:]) == ["<|eos|>", "Ċ", "<|eos|>"]
    assert enc.prompt_length == len(prompt) and enc.ids[: len(prompt)] == prompt
    assert t.decode(enc.ids[enc.prompt_length :]) == "Jane Doe wrote it.<|eos|>\n<|eos|>"
    # the attention mask hides every pad-id (= EOS) token, the in-prompt ones too
    assert enc.attention_mask == [int(i != t.eos_token_id) for i in enc.ids]
    assert enc.attention_mask.count(0) == 5  # date, system, user, answer, the appended one
    assert encode_question(t, Q, template=TofuTemplate(kind="chat")) == prompt
    # the answer's offsets start at 0 (the chat boundary is a token boundary)
    assert enc.offsets[0][0] == 0
    assert A[enc.offsets[0][0] : enc.offsets[0][1]] == t.decode(enc.ids[enc.prompt_length : enc.prompt_length + 1])


def test_chat_options_and_auto(chat_tok):
    t = chat_tok
    bare = encode_qa(t, Q, A, template=TofuTemplate(kind="chat", system_prompt="", date_string=None))
    expected = t("<|bos|>user\nWho wrote X?<|eos|>\n<|bos|>assistant\nJane Doe wrote it.<|eos|>\n")["input_ids"]
    assert bare.ids == expected + [t.eos_token_id]
    other = encode_qa(t, Q, A, template=TofuTemplate(kind="chat", system_prompt="Be brief.", date_string="1 Jan"))
    assert "Be brief." in t.decode(other.ids) and "1 Jan" in t.decode(other.ids)
    # auto = chat when the tokenizer has a chat template
    assert encode_qa(t, Q, A).ids == encode_qa(t, Q, A, template=TofuTemplate(kind="chat")).ids
    assert encode_qa(t, Q, A, template=TofuTemplate(kind="plain")).ids[0] == t("Question")["input_ids"][0]


def test_template_errors(tok):
    with pytest.raises(ForgetfulError, match="template must be one of auto, chat, plain"):
        TofuTemplate(kind="llama")
    with pytest.raises(ForgetfulError, match="has no chat template"):
        encode_qa(tok, Q, A, template=TofuTemplate(kind="chat"))


# --------------------------------------------------------------------------------------------
# The real tokenizer (SmolLM2-135M-Instruct), token by token as open-unlearning encodes it
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tok():
    from forgetful.models.gguf import converted_folder
    from forgetful.models.loading import load_tokenizer

    return load_tokenizer(str(converted_folder("smollm2-135m")))


@pytest.mark.slow
def test_smollm2_chat_encoding(smollm2_tok):
    t = smollm2_tok
    enc = encode_qa(t, Q, A)  # auto: the chat template
    assert _tokens(t, enc.ids) == [
        *["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", ".", "<|im_end|>", "Ċ"],
        *["<|im_start|>", "user", "Ċ", "Who", "Ġwrote", "ĠX", "?", "<|im_end|>", "Ċ"],
        *["<|im_start|>", "ass", "istant", "Ċ"],
        *["Jane", "ĠDo", "e", "Ġwrote", "Ġit", ".", "<|im_end|>", "Ċ", "<|im_end|>"],
    ]
    assert enc.prompt_length == 24  # scored: Jane ... . <|im_end|> Ċ <|im_end|>
    zeros = [i for i, m in enumerate(enc.attention_mask) if m == 0]
    assert zeros == [9, 18, 30, 32]  # every <|im_end|> (pad = EOS)
    assert _tokens(t, encode_question(t, Q)) == _tokens(t, enc.ids[:24])
    assert enc.offsets[:3] == [(0, 4), (4, 7), (7, 8)]


@pytest.mark.slow
def test_smollm2_plain_encoding(smollm2_tok):
    t = smollm2_tok
    plain = TofuTemplate(kind="plain")
    enc = encode_qa(t, Q, A, template=plain)
    tokens = _tokens(t, enc.ids)
    assert tokens == ["Question", ":", "ĠWho", "Ġwrote", "ĠX", "?", "Ċ", "Answer", ":"] + [
        *["ĠJane", "ĠDo", "e", "Ġwrote", "Ġit", ".", "<|im_end|>"]
    ]
    assert enc.prompt_length == 10  # "ĠJane" (index 9) unscored: scoring starts at "ĠDo"
    assert _tokens(t, encode_question(t, Q, template=plain))[-2:] == [":", "Ġ"]
    assert enc.attention_mask == [1] * 15 + [0]
