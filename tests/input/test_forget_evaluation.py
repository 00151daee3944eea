"""The FLOP model against a hand count, and eval-forget end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from forgetful.cli import main
from forgetful.errors import ForgetfulError
from forgetful.input.evaluation import flops_ratios
from forgetful.input.flops import decoder_dims, forward_flops
from forgetful.input.options import parse_keep
from forgetful.input.policies import MLPForgetMask


def test_gpt2_flops_match_a_hand_count(tiny_gpt2):
    model, tok = tiny_gpt2
    cfg = model.config  # d=32, 2 layers, 2 heads, MLP 4d, vocab V
    V = cfg.vocab_size
    per_layer = 4 * 32 * 32 + 2 * 32 * 128  # Q, K, V, O projections + two MLP matrices
    linear = 2 * 2 * per_layer * 10  # 2 FLOPs per multiply-add, 2 layers, 10 tokens
    attention = 2 * 2 * 32 * 10 * 10  # causal QK^T and AV: 2 * d * L^2 per layer
    head = 2 * 32 * V * 3  # logits at 3 positions
    assert forward_flops(cfg, 10, logit_positions=3) == linear + attention + head


def test_llama_flops_match_a_hand_count(tiny_llama):
    model, _ = tiny_llama
    cfg = model.config  # d=32, 2 heads (head_dim 16), 1 KV head, gated MLP of width 88
    dims = decoder_dims(cfg)
    assert (dims.hidden, dims.heads, dims.kv_heads, dims.intermediate, dims.gated_mlp) == (32, 2, 1, 88, True)
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 88
    expected = 2 * 2 * per_layer * 7 + 2 * 2 * 32 * 49 + 2 * 32 * cfg.vocab_size * 7
    assert forward_flops(cfg, 7) == expected


def test_flops_ratio_counts_kept_tokens_and_policy_cost(tiny_gpt2):
    from forgetful.input.examples import ForgetBatch

    model, _ = tiny_gpt2
    cfg = model.config
    batch = ForgetBatch(
        torch.zeros(1, 8, dtype=torch.long),
        torch.ones(1, 8, dtype=torch.bool),
        torch.zeros(1, 2, dtype=torch.long),
        torch.ones(1, 2, dtype=torch.bool),
    )
    keep = torch.tensor([[True, False, True, False, True, False, True, False]])
    fr, afr = flops_ratios(cfg, [batch], [keep], policy_flops_per_token=100.0)
    assert fr == pytest.approx((forward_flops(cfg, 6, 2) + 800) / forward_flops(cfg, 10, 2))
    assert afr == pytest.approx(36 / 100)


@pytest.mark.parametrize("text", ["", "0", "1.5", "a,b", "-0.5"])
def test_bad_keep_ratios(text):
    with pytest.raises(ForgetfulError, match="keep"):
        parse_keep(text)


def test_keep_ratios_parse_to_a_sorted_set():
    assert parse_keep("0.25,1,0.5,0.5") == [1.0, 0.5, 0.25] and parse_keep(0.9) == [0.9]
    with pytest.raises(ForgetfulError, match=r"must lie in \(0, 1\)"):
        parse_keep("1", allow_one=False)


def test_eval_forget_writes_complete_finite_results(tiny_model_dir, tiny_llama, tmp_path):
    model, _ = tiny_llama
    policy_dir = tmp_path / "mlp"
    MLPForgetMask(model, hidden_size=16).save_pretrained(policy_dir)
    out = tmp_path / "eval"
    rc = main(
        [
            "eval-forget",
            "--model",
            str(tiny_model_dir),
            "--mask-dir",
            str(policy_dir),
            "--out",
            str(out),
            "--keep",
            "1,0.5,0.25",
            "--max-examples",
            "8",
            "--batch-size",
            "4",
            "--timing-repeats",
            "1",
        ]
    )
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    strategies = {"identity", "none", "random", "recency", "self_information", "attention_score", "mlp"}
    assert {(r["strategy"], r["keep_ratio"]) for r in rows} == {(s, k) for s in strategies for k in (1.0, 0.5, 0.25)}
    fields = ["kept_tokens", "nll", "ppl", "flops_ratio", "attn_flops_ratio", "wall_ms", "peak_mem_mb", "speedup"]
    for r in rows:
        assert all(isinstance(r[f], float | int) and math.isfinite(r[f]) for f in fields), r
        assert r["device"] == "cpu" and r["peak_mem_mb"] > 0
    half = {r["strategy"]: r for r in rows if r["keep_ratio"] == 0.5}
    assert half["recency"]["kept_tokens"] == half["mlp"]["kept_tokens"] == half["random"]["kept_tokens"]
    assert half["identity"]["flops_ratio"] == pytest.approx(1.0)
    assert half["recency"]["flops_ratio"] < 0.75 and half["none"]["kept_tokens"] == 1.0
    assert (out / "report.md").read_text().count("| mlp |") == 3
    assert (out / "nll_vs_keep.png").stat().st_size > 1000 and (out / "speedup_vs_keep.png").is_file()


def test_untimed_evaluation_reports_quality_only(tiny_llama, tmp_path):
    """timing_repeats=0 (a CPU demo): no wall time, speedup or memory anywhere, no speed plot, and the
    quality and FLOP numbers are those of a timed run."""
    from forgetful.input.eval_report import add_speedups, write_report
    from forgetful.input.evaluation import evaluate_forgetting
    from forgetful.input.examples import load_forget_examples

    model, tok = tiny_llama
    data = load_forget_examples(None, tok, embedded_examples=8, seed=3)
    kw = dict(
        keep_ratios=[1.0, 0.5],
        pad_token_id=tok.pad_token_id,
        batch_size=4,
        progress=False,
        strategies=("identity", "none", "random", "recency"),
    )
    untimed = evaluate_forgetting(model, {}, data, timing_repeats=0, **kw)
    timed = evaluate_forgetting(model, {}, data, timing_repeats=1, **kw)
    add_speedups(untimed)
    for a, b in zip(untimed, timed):
        assert a["wall_ms"] is None and a["speedup"] is None and a["peak_mem_mb"] is None
        assert (a["strategy"], a["nll"], a["flops_ratio"]) == (b["strategy"], b["nll"], b["flops_ratio"])
    md = write_report(untimed, tmp_path / "r")
    assert "wall_ms" not in md and "speedup" not in md
    assert (tmp_path / "r" / "nll_vs_keep.png").is_file() and not (tmp_path / "r" / "speedup_vs_keep.png").exists()


def test_peak_memory_tracker_sees_live_tensors():
    from forgetful.measure import peak_memory_mb

    def work():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # 4 MiB more while a lives
        del a
        return b.sum()

    mb, method = peak_memory_mb(work, "cpu")
    assert method == "cpu_live_tensors" and 7.9 < mb < 8.5


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_greedy_answers_from_the_full_context_equal_transformers_generate(fixture, request):
    """With every token kept, our cached greedy decoding (left padding, explicit positions) gives
    what model.generate gives from each prompt alone."""
    from forgetful.input.examples import ForgetCollator
    from forgetful.input.generation import generate_answers

    model, tok = request.getfixturevalue(fixture)
    g = torch.Generator().manual_seed(0)
    rows = [
        {"context_ids": torch.randint(5, 300, (n,), generator=g).tolist(), "target_ids": [5], "answer": "x"}
        for n in (9, 6, 4)
    ]
    batch = ForgetCollator(tok.pad_token_id)(rows)
    ours = generate_answers(model, tok, batch, batch.context_mask.clone(), max_new_tokens=6)
    for row, text in zip(rows, ours):
        ids = torch.tensor([row["context_ids"]])
        ref = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        assert text == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_greedy_answers_from_a_compressed_context_continue_its_original_positions(tiny_llama):
    """A compressed prompt answers as the full prompt with the forgotten tokens masked out (the same
    positions): compared token by token over the first steps."""
    from forgetful.input.generation import greedy_generate

    model, tok = tiny_llama
    ids = torch.randint(5, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([[True, True, False, True, False, False, True, True, False, True]])
    short = ids[keep].unsqueeze(0)
    positions = torch.arange(10)[keep[0]].unsqueeze(0)
    ours = greedy_generate(
        model,
        short,
        torch.ones_like(short),
        positions,
        torch.tensor([10]),
        max_new_tokens=4,
        eos_token_id=None,
        pad_token_id=tok.pad_token_id,
    )
    # the reference: the full prompt with the forgotten tokens masked, one token at a time, no cache
    seq, mask = ids.clone(), keep.long()
    for step in range(4):
        logits = model(input_ids=seq, attention_mask=mask, use_cache=False).logits[0, -1]
        assert int(logits.argmax()) == int(ours[0, step])
        seq = torch.cat([seq, ours[:, step : step + 1]], 1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)


def test_the_report_shows_the_full_and_no_context_once(tmp_path):
    from forgetful.input.eval_report import write_report

    def row(strategy, keep, nll):
        return {
            "strategy": strategy,
            "keep_ratio": keep,
            "nll": nll,
            "ppl": 1.0,
            "kept_tokens": 1,
            "fact_recall": None,
            "flops_ratio": 1.0,
            "attn_flops_ratio": 1.0,
            "speedup": None,
        }

    rows = [row(s, k, n) for k in (0.5, 0.25) for s, n in (("identity", 1.0), ("none", 3.0), ("recency", 2.0 + k))]
    md = write_report(rows, tmp_path)
    assert md.count("| identity |") == 1 and md.count("| none |") == 1 and md.count("| recency |") == 2
    assert "| identity | any |" in md
