"""The attention-score baseline (SnapKV / H2O) against a manual computation from the attention
probabilities that transformers returns with ``output_attentions`` (eager attention)."""

from __future__ import annotations

import pytest
import torch

from forgetful.errors import ForgetfulError
from forgetful.input.policies import AttentionScoreMask, attention_scores, build_mask
from forgetful.models.layers import early_hidden_states


def _batch(lengths, vocab=300, seed=0):
    n = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), n), generator=g)
    attn = torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return ids.masked_fill(~attn, 0), attn


def _manual(model, ids, attn, window, layers):
    impl = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            probs = model(input_ids=ids, attention_mask=attn.long(), output_attentions=True, use_cache=False).attentions
    finally:
        model.config._attn_implementation = impl
    manual = torch.zeros(ids.shape)
    for b, n in enumerate(attn.sum(-1).tolist()):
        queries = list(range(max(0, n - window), n))
        for layer in layers:
            manual[b] += probs[layer][b, :, queries, :].sum(dim=(0, 1))
    return manual


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize(("window", "layers"), [(3, None), (1, [1]), (50, [0])])
def test_scores_equal_the_attention_that_output_attentions_reports(fixture, window, layers, request):
    model, _ = request.getfixturevalue(fixture)
    ids, attn = _batch([10, 7, 4])
    got = attention_scores(model, ids, attn, window=window, layers=layers)
    expected = _manual(model, ids, attn, window, layers if layers is not None else [0, 1])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # window >= n: every query counts (H2O's cumulative attention); each head's query row sums to 1
    if window == 50:
        heads = model.config.num_attention_heads if fixture == "tiny_llama" else model.config.n_head
        assert torch.allclose(got.sum(-1), heads * attn.sum(-1).float(), atol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # the scorer's attention is restored


def test_the_mask_keeps_the_budget_the_window_and_the_most_attended(tiny_llama):
    model, _ = tiny_llama
    ids, attn = _batch([16, 12])
    mask = build_mask("attention_score", model, window=2, pool=0)
    assert isinstance(mask, AttentionScoreMask)
    keep = mask.greedy(ids, attn, keep_ratio=0.5)
    assert keep.sum(-1).tolist() == [8, 6]
    for r, n in enumerate([16, 12]):
        assert keep[r, 0] and keep[r, n - 2 : n].all()  # token 0 and the observation window
    scores = attention_scores(model, ids, attn, window=2)
    free = keep.clone()
    for r, n in enumerate([16, 12]):
        free[r, 0] = free[r, n - 2 : n] = False
        rest = torch.zeros_like(free[r])
        rest[1 : n - 2] = True
        best = scores[r].masked_fill(~rest, -1).topk(int(free[r].sum())).indices
        assert set(best.tolist()) == set(free[r].nonzero().flatten().tolist())
    pooled = build_mask("attention_score", model, window=2, pool=3).keep_logits(ids, attn)
    assert torch.isfinite(pooled[attn]).all() and (pooled[~attn] == float("-inf")).all()
    assert mask.extra_flops_per_token(16) > 0


def test_bad_options_are_one_clear_error(tiny_llama):
    model, _ = tiny_llama
    ids, attn = _batch([6])
    with pytest.raises(ForgetfulError, match="pool must be 0, 1 or an odd width"):
        build_mask("attention_score", model, pool=2)
    with pytest.raises(ForgetfulError, match="layers must lie in 0..1"):
        attention_scores(model, ids, attn, layers=[5])
    with pytest.raises(ForgetfulError, match="needs a causal LM"):
        build_mask("attention_score")


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_early_hidden_states_equal_the_full_forward_at_that_layer(fixture, request):
    model, _ = request.getfixturevalue(fixture)
    ids, attn = _batch([9, 5])
    early = early_hidden_states(model, ids, attn, layer=1)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn.long(), output_hidden_states=True, use_cache=False)
    torch.testing.assert_close(early[attn], full.hidden_states[1][attn], atol=1e-5, rtol=1e-5)
    assert len(list(model.modules())) == len(list(model.modules()))  # the layer list is restored
    assert sum(1 for _ in model.parameters()) == sum(1 for _ in model.parameters())
