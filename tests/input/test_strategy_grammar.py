"""One grammar for strategies (name[:key=value,...][@unit]), and the baselines it reaches: SnapKV
and GemFilter at a depth, two-round lexical overlap."""

from __future__ import annotations

import pytest
import torch

from forgetful.errors import ForgetfulError
from forgetful.input.policies import attention_scores, build_mask, parse_strategy
from forgetful.input.strategy import StrategySpec, split_strategies

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parse_reads_names_options_and_units():
    spec = parse_strategy("snapkv:window=8,layer=4@sentence")
    assert spec == StrategySpec("snapkv", (("layer", 4), ("window", 8)), "sentence")
    assert str(spec) == "snapkv:layer=4,window=8@sentence"  # canonical: options sorted
    assert parse_strategy("recency@chunk:64").unit == "chunk:64"
    assert parse_strategy("lexical:rounds=2,doc_tokens=16.5,tag=x,on=true").kwargs == {
        "doc_tokens": 16.5,
        "on": True,
        "rounds": 2,
        "tag": "x",
    }
    assert parse_strategy("attention_score:layers=0|1|2").kwargs == {"layers": [0, 1, 2]}
    assert str(parse_strategy("recency")) == "recency"
    for bad, match in [
        ("", "empty strategy"),
        ("recency@", "nothing after '@'"),
        ("recency:", "nothing after ':'"),
        ("recency:layer", "not key=value"),
        ("recency:a=1,a=2", "given twice"),
        ("recency@paragraph", "unknown unit"),
        ("rec ency", "not a strategy name"),
    ]:
        with pytest.raises(ForgetfulError, match=match):
            parse_strategy(bad)


def test_split_keeps_options_with_their_strategy():
    assert split_strategies("snapkv:layer=4,window=8@sentence, recency,lexical:rounds=2@task") == [
        "snapkv:layer=4,window=8@sentence",
        "recency",
        "lexical:rounds=2@task",
    ]
    with pytest.raises(ForgetfulError, match="cannot be one of its options"):
        split_strategies("snapkv:layer=4@sentence,window=8")


def test_build_mask_checks_options_and_reports_the_canonical_name(tiny_llama, tmp_path):
    model, _ = tiny_llama
    mask = build_mask("recency:forget_layer=2@chunk:4")
    assert (mask.forget_layer, mask.unit, mask.strategy) == (2, "chunk:4", "recency:forget_layer=2@chunk:4")
    with pytest.raises(ForgetfulError, match="snapkv has no option layers; its options: forget_layer, layer, pool"):
        build_mask("snapkv:layers=1", model)
    with pytest.raises(ForgetfulError, match="forget_layer must be a layer count"):
        build_mask("recency:forget_layer=-1")
    with pytest.raises(ForgetfulError, match="unknown strategy 'nope'"):
        build_mask("nope")
    policy = build_mask("residual", model, prior="recency", unit="chunk:4", layer=1)
    policy.save_pretrained(tmp_path / "policy")
    loaded = build_mask(f"{tmp_path / 'policy'}:forget_layer=1", model)
    assert loaded.learned and loaded.forget_layer == 1 and loaded.unit == "chunk:4"
    with pytest.raises(ForgetfulError, match="a baseline is expected"):
        build_mask(str(tmp_path / "policy"), model, learned=False)


def test_snapkv_and_gemfilter_read_the_layers_they_name(tiny_llama):
    model, _ = tiny_llama
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 20), generator=g)
    attn = torch.ones_like(ids, dtype=torch.bool)
    snap = build_mask("snapkv:layer=1,pool=0,window=4", model)
    expected = attention_scores(model, ids, attn, window=4, layers=[0])
    window = torch.zeros_like(attn)
    window[:, -4:] = True
    torch.testing.assert_close(snap.keep_logits(ids, attn), expected + 1e4 * window.float())
    gem = build_mask("gemfilter:layer=2", model)  # the second layer alone, the last token's query
    last = torch.zeros_like(attn)
    last[:, -1] = True
    torch.testing.assert_close(
        gem.keep_logits(ids, attn), attention_scores(model, ids, attn, window=1, layers=[1]) + 1e4 * last.float()
    )
    assert build_mask("gemfilter", model).layer == 2  # 12, or the model's last layer
    one, two = (build_mask(f"snapkv:layer={k}", model).extra_flops_per_token(20) for k in (1, 2))
    assert two == pytest.approx(2 * one)
    assert (snap.scorer_layers(), gem.scorer_layers()) == (1, 2)


def test_two_round_lexical_finds_the_second_hop():
    # units: 0 = [q, x] (shares q with the question), 1 = [x, a] (the second hop: shares only the
    # bridge x), 2 = [f, g] (filler, the most recent); question = [q]
    q, x, a, f, g, pad = 10, 11, 12, 13, 14, 15
    ids = torch.tensor([[1, q, x, pad, x, a, pad, f, g, pad, q]])
    units = torch.tensor([[-1, 0, 0, 0, 1, 1, 1, 2, 2, 2, -1]])
    protect = torch.zeros_like(ids, dtype=torch.bool)
    protect[0, -1] = True
    kept = {}
    for rounds in (1, 2):
        mask = build_mask(f"lexical:rounds={rounds},seed_units=1@task")
        keep = mask.greedy(ids, keep_ratio=0.6, protect=protect, units=units)
        kept[rounds] = set(units[0][keep[0] & (units[0] >= 0)].tolist())
    assert kept[1] == {0, 2}  # the question alone finds hop 1; recency breaks the tie for the rest
    assert kept[2] == {0, 1}  # hop 1's words find hop 2


def test_a_residual_policy_over_a_prior_with_options_starts_equal_to_it(tiny_llama):
    """The residual policy takes its prior in the grammar (``lexical:rounds=2``: multi-hop's default)
    and, untrained, keeps what that prior keeps; a prior it cannot use is refused."""
    model, _ = tiny_llama
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=g)
    units = torch.arange(24).div(4, rounding_mode="floor").expand(2, -1).clone()
    units[:, 0] = -1
    protect = torch.zeros_like(ids, dtype=torch.bool)
    protect[:, -3:] = True
    units[protect] = -1
    prior = build_mask("lexical:rounds=2,seed_units=1@task")
    policy = build_mask("residual", model, prior="lexical:rounds=2,seed_units=1", unit="task", layer=1)
    kw = dict(keep_ratio=0.5, protect=protect, units=units)
    assert torch.equal(policy.greedy(ids, **kw), prior.greedy(ids, **kw))
    with pytest.raises(ForgetfulError, match="prior must be one of"):
        build_mask("residual", model, prior="snapkv:layer=1", layer=1)
