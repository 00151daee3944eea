"""Tests for forgetful.input.policies: the forget-mask policies, their budgets, locality and save/load."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_tiny
from safetensors import safe_open

from forgetful.errors import ForgetfulError
from forgetful.input.compression import kept_counts
from forgetful.input.policies import (
    CNNMLPForgetMask,
    HiddenStateForgetMask,
    IdentityMask,
    LearnedForgetMask,
    LexicalOverlapMask,
    MLPForgetMask,
    NoContextMask,
    RandomForgetMask,
    RecencyMask,
    ResidualForgetMask,
    RNNForgetMask,
    SelfInformationMask,
    build_mask,
    distance_buckets,
    mask_names,
)

HIDDEN = 16
LENGTHS = [10, 7, 3, 1, 0]  # right-padded rows of different lengths, one fully padded


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def batch(lengths=LENGTHS, width=None, seed=0, vocab=300):
    n = max(width or 0, max(lengths), 1)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), n), generator=g)
    attn = torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return ids.masked_fill(~attn, 0), attn.long()


def learned(kind: str, model, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLPForgetMask(model, hidden_size=HIDDEN)
    if kind == "cnn_mlp":
        return CNNMLPForgetMask(model, hidden_size=HIDDEN, kernel_size=3)
    if kind == "rnn":
        return RNNForgetMask(model, hidden_size=HIDDEN)
    if kind == "birnn":
        return RNNForgetMask(model, hidden_size=HIDDEN, bidirectional=True)
    if kind == "bilstm":
        return RNNForgetMask(model, hidden_size=HIDDEN, bidirectional=True, cell="lstm")
    if kind == "lstm":
        return RNNForgetMask(model, hidden_size=HIDDEN, cell="lstm")
    if kind == "hidden_state":
        return HiddenStateForgetMask(model, hidden_size=HIDDEN, layer=1, window=2)
    if kind == "residual":
        return ResidualForgetMask(model, hidden_size=HIDDEN, layer=1, window=2, unit="token")
    raise AssertionError(kind)


LEARNED = ["mlp", "cnn_mlp", "rnn", "birnn", "lstm", "bilstm", "hidden_state", "residual"]
BUDGETED = ["random", "recency", "lexical", "self_information", *LEARNED]


def policy(kind: str, model):
    if kind == "identity":
        return IdentityMask()
    if kind == "none":
        return NoContextMask()
    if kind == "random":
        return RandomForgetMask(0.3, generator=torch.Generator().manual_seed(0))
    if kind == "recency":
        return RecencyMask()
    if kind == "self_information":
        return SelfInformationMask(model)
    if kind == "lexical":
        return LexicalOverlapMask(window=2)
    return learned(kind, model)


def expected_counts(kind, attn, forget_p, keep_first):
    lengths = attn.sum(-1)
    if kind == "identity":
        return lengths
    if kind == "none":
        return (lengths > 0).long() if keep_first else torch.zeros_like(lengths)
    return kept_counts(lengths, keep_ratio=1 - forget_p, keep_first=keep_first)


@pytest.fixture(scope="module")
def model(tiny_gpt2):
    return tiny_gpt2[0]


# ------------------------------------------------------------------------------------------
# exact budgets for every policy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["identity", "none", *BUDGETED])
@pytest.mark.parametrize("keep_first", [True, False])
def test_every_policy_keeps_exactly_the_budget(kind, keep_first, model):
    ids, attn = batch()
    mask = policy(kind, model)
    for forget_p in (0.0, 0.5, 0.8):
        k = expected_counts(kind, attn, forget_p, keep_first)
        keep = mask.greedy(ids, attn, keep_ratio=1 - forget_p, keep_first=keep_first)
        assert keep.shape == ids.shape and keep.dtype == torch.bool
        assert keep.sum(-1).tolist() == k.tolist(), (kind, forget_p)
        assert not (keep & ~attn.bool()).any()
        s = mask.sample(
            ids,
            attn,
            keep_ratio=1 - forget_p,
            keep_first=keep_first,
            num_samples=3,
            generator=torch.Generator().manual_seed(1),
        )
        assert s.keep.shape == (3, *ids.shape)
        assert (s.keep.sum(-1) == k).all(), (kind, forget_p)
        assert not (s.keep & ~attn.bool()).any()
        assert s.log_prob.shape == (3, ids.shape[0])
        if keep_first:
            assert keep[:, 0].tolist() == (attn[:, 0] == 1).tolist()
            assert (s.keep[..., 0] == attn[:, 0].bool()).all()


@pytest.mark.parametrize("kind", BUDGETED)
def test_explicit_budget_and_token_zero_not_forced(kind, model):
    ids, attn = batch([9, 6, 4, 2])
    mask = policy(kind, model)
    budget = torch.tensor([5, 3, 4, 1])
    keep = mask.greedy(ids, attn, budget=budget)
    assert keep.sum(-1).tolist() == budget.tolist()
    assert keep[:, 0].all()
    s = mask.sample(ids, attn, budget=budget, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert (s.keep.sum(-1) == budget).all()
    # keep_first=False: a zero budget keeps nothing, so token 0 is not forced in
    assert not mask.greedy(ids, attn, budget=0, keep_first=False).any()
    assert not mask.sample(ids, attn, budget=0, keep_first=False).keep.any()
    with pytest.raises(ForgetfulError, match="larger than the context"):
        mask.greedy(ids, attn, budget=3)  # the last row has 2 tokens
    with pytest.raises(ForgetfulError, match="larger than the context"):
        mask.sample(ids, attn, budget=10)


@pytest.mark.parametrize("kind", ["identity", "none", *BUDGETED])
def test_policies_reject_bad_input(kind, model):
    ids, attn = batch([6, 4])
    mask = policy(kind, model)
    with pytest.raises(ForgetfulError, match="attention_mask has shape"):
        mask.greedy(ids, attn[:, :3])
    with pytest.raises(ForgetfulError, match="attention_mask has shape"):
        mask.sample(ids, attn[:1])
    with pytest.raises(ForgetfulError, match=r"input_ids must be \[batch, length\]"):
        mask.greedy(ids[0])
    if kind not in ("identity", "none"):
        for bad in (1.5, -0.2, 3):
            with pytest.raises(ForgetfulError, match=r"keep_ratio must lie in \[0, 1\]"):
                mask.greedy(ids, attn, keep_ratio=bad)
            with pytest.raises(ForgetfulError, match=r"keep_ratio must lie in \[0, 1\]"):
                mask.sample(ids, attn, keep_ratio=bad)


@pytest.mark.parametrize("kind", ["identity", "none", *BUDGETED])
def test_unknown_sampling_mode_raises(kind, model):
    """BUG for 'random' (see report): RandomForgetMask.sample never validates ``mode``."""
    ids, attn = batch([6, 4])
    with pytest.raises(ForgetfulError, match="mode must be one of exact, bernoulli"):
        policy(kind, model).sample(ids, attn, keep_ratio=0.5, mode="topk")


@pytest.mark.parametrize("kind", LEARNED)
def test_learned_policy_needs_keep_ratio_or_budget(kind, model):
    ids, attn = batch([6, 4])
    with pytest.raises(ForgetfulError, match="give keep_ratio"):
        learned(kind, model).greedy(ids, attn)


@pytest.mark.parametrize("kind", ["identity", "none", *BUDGETED])
@pytest.mark.parametrize("keep_first", [True, False])
def test_sample_log_probs_are_finite(kind, keep_first, model):
    """BUG for self_information with keep_first=False (see report): token 0's +inf score gives NaN."""
    ids, attn = batch()
    mask = policy(kind, model)
    for mode in ("exact", "bernoulli"):
        s = mask.sample(
            ids,
            attn,
            keep_ratio=0.5,
            mode=mode,
            keep_first=keep_first,
            num_samples=2,
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.isfinite(s.log_prob).all(), mode
        assert torch.isfinite(s.entropy).all(), mode
        assert (s.log_prob <= 1e-5).all()
        assert not (s.keep & ~attn.bool()).any()


# ------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------


def test_identity_keeps_everything():
    ids, attn = batch()
    mask = IdentityMask()
    assert torch.equal(mask.greedy(ids, attn, keep_ratio=0.1), attn.bool())
    s = mask.sample(ids, attn, keep_ratio=0.1, mode="bernoulli", num_samples=2)
    assert torch.equal(s.keep, attn.bool().expand(2, *attn.shape))
    assert (s.log_prob == 0).all()
    assert torch.equal(mask.greedy(ids), torch.ones_like(ids, dtype=torch.bool))


def test_no_context_keeps_only_token_zero():
    ids, attn = batch()
    mask = NoContextMask()
    expected = torch.zeros_like(attn, dtype=torch.bool)
    expected[:, 0] = attn[:, 0].bool()
    assert torch.equal(mask.greedy(ids, attn, keep_ratio=1), expected)
    assert torch.equal(mask.sample(ids, attn, keep_ratio=1, num_samples=2).keep[1], expected)
    assert not mask.greedy(ids, attn, keep_first=False).any()


def test_no_context_bernoulli_keeps_only_token_zero():
    """BUG (see report): in Bernoulli mode NoContextMask keeps each token with probability 0.5."""
    ids, attn = batch([12, 12])
    s = NoContextMask().sample(ids, attn, mode="bernoulli", num_samples=4, generator=torch.Generator().manual_seed(0))
    assert s.keep[..., 1:].sum() == 0
    assert s.keep[..., 0].all()


def test_recency_keeps_the_last_tokens():
    ids, attn = batch([10, 7, 4])
    mask = RecencyMask()
    for b in (1, 2, 3, 4):
        keep = mask.greedy(ids, attn, budget=b)
        for r, n in enumerate([10, 7, 4]):
            # b tokens in all: token 0 (forced) plus the last b - 1
            assert keep[r].nonzero().flatten().tolist() == sorted({0, *range(n - b + 1, n)})
        keep = mask.greedy(ids, attn, budget=b, keep_first=False)
        for r, n in enumerate([10, 7, 4]):
            assert keep[r].nonzero().flatten().tolist() == list(range(n - b, n))
    # forget_p: round(0.5 * 10) = 5 -> token 0 and tokens 6..9
    assert mask.greedy(ids, attn, keep_ratio=0.5)[0].nonzero().flatten().tolist() == [0, 6, 7, 8, 9]


def test_random_mask_is_reproducible_with_a_seeded_generator():
    ids, attn = batch([20, 15])

    def run(seed):
        m = RandomForgetMask(0.5, generator=torch.Generator().manual_seed(seed))
        return (m.greedy(ids, attn), m.sample(ids, attn).keep, m.sample(ids, attn, mode="bernoulli").keep)

    a, b, c = run(3), run(3), run(4)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))
    # its default forget_prob gives the budget
    assert a[0].sum(-1).tolist() == kept_counts(torch.tensor([20, 15]), keep_ratio=0.5).tolist()


def test_random_mask_bernoulli_rate():
    ids = torch.ones(50, 101, dtype=torch.long)
    m = RandomForgetMask(0.3, generator=torch.Generator().manual_seed(0))
    keep = m.sample(ids, mode="bernoulli").keep[0]
    n = keep[:, 1:].numel()
    forgotten = int((~keep[:, 1:]).sum())
    assert abs(forgotten - 0.3 * n) < 4 * (n * 0.3 * 0.7) ** 0.5
    assert keep[:, 0].all()
    with pytest.raises(ForgetfulError, match="forget_prob must lie in"):
        RandomForgetMask(1.0)


def test_self_information_keeps_highest_surprisal(model):
    ids, attn = batch([12, 9], seed=3)
    mask = SelfInformationMask(model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
    logp = torch.log_softmax(logits, -1)
    scores = mask.keep_logits(ids, attn)
    assert (scores[:, :1] > scores[:, 1:]).all()  # token 0 (no prediction) always ranks first
    for r, n in enumerate([12, 9]):
        surprisal = [-float(logp[r, t - 1, ids[r, t]]) for t in range(1, n)]
        assert scores[r, 1:n].tolist() == pytest.approx(surprisal, abs=1e-4)
        assert torch.isneginf(scores[r, n:]).all()
        keep = mask.greedy(ids[r : r + 1, :n], budget=4)[0]
        top = sorted(range(1, n), key=lambda t: -surprisal[t - 1])[:3]
        assert keep.nonzero().flatten().tolist() == sorted([0, *top])
    assert mask.extra_flops_per_token(12) > 0
    assert "_scorer" not in dict(mask.named_modules())  # the scorer is not a submodule
    assert len(list(mask.parameters())) == 0


# ------------------------------------------------------------------------------------------
# learned policies: what each logit depends on
# ------------------------------------------------------------------------------------------


def changed(ids, pos, vocab=300):
    out = ids.clone()
    out[0, pos] = (out[0, pos] + 17) % (vocab - 5) + 5
    assert out[0, pos] != ids[0, pos]
    return out


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_direction(cell, model):
    ids, attn = batch([8])
    i = 3
    uni = RNNForgetMask(model, hidden_size=HIDDEN, cell=cell)
    bi = RNNForgetMask(model, hidden_size=HIDDEN, cell=cell, bidirectional=True)
    with torch.no_grad():
        for p, sees_future in ((uni, False), (bi, True)):
            base = p.keep_logits(ids, attn)[0, i]
            later = p.keep_logits(changed(ids, 6), attn)[0, i]
            earlier = p.keep_logits(changed(ids, 1), attn)[0, i]
            assert abs(float(earlier - base)) > 1e-6  # both see the past
            if sees_future:
                assert abs(float(later - base)) > 1e-6
            else:
                assert float(later) == pytest.approx(float(base), abs=1e-6)


@pytest.mark.parametrize("kernel", [3, 5])
def test_cnn_logit_depends_only_on_neighbours(kernel, model):
    ids, attn = batch([11])
    p = CNNMLPForgetMask(model, hidden_size=HIDDEN, kernel_size=kernel)
    i, half = 5, kernel // 2
    with torch.no_grad():
        base = p.keep_logits(ids, attn)[0]
        for j in range(11):
            other = p.keep_logits(changed(ids, j), attn)[0]
            if abs(j - i) <= half:
                assert abs(float(other[i] - base[i])) > 1e-6, j
            else:
                assert float(other[i]) == pytest.approx(float(base[i]), abs=1e-6), j
        # same tokens, one more token at the end: the distance to the end (and so the logit) changes
        longer_ids, longer_attn = batch([12])
        longer_ids[0, :11] = ids[0]
        moved = p.keep_logits(longer_ids, longer_attn)[0, 2]
        assert abs(float(moved - base[2])) > 1e-6


def test_mlp_logit_ignores_other_tokens(model):
    ids, attn = batch([9])
    p = MLPForgetMask(model, hidden_size=HIDDEN)
    i = 4
    other = batch([9], seed=7)[0]
    other[0, i] = ids[0, i]
    assert (other[0] != ids[0]).sum() >= 7
    with torch.no_grad():
        a = p.keep_logits(ids, attn)[0, i]
        b = p.keep_logits(other, attn)[0, i]
        c = p.keep_logits(changed(ids, i), attn)[0, i]
    assert float(a) == pytest.approx(float(b), abs=1e-6)
    assert abs(float(c - a)) > 1e-6  # its own token matters


@pytest.mark.parametrize("kind", [*LEARNED, "self_information"])
def test_padding_does_not_change_real_logits(kind, model):
    """Each row scored in a padded batch equals the row scored alone; padding ids are irrelevant."""
    lengths = [10, 6, 3]
    ids, attn = batch(lengths)
    p = policy(kind, model)
    with torch.no_grad():
        together = p.keep_logits(ids, attn)
        noisy_pad = ids.masked_fill(~attn.bool(), 123)
        again = p.keep_logits(noisy_pad, attn)
        for r, n in enumerate(lengths):
            alone = p.keep_logits(ids[r : r + 1, :n])[0]
            torch.testing.assert_close(together[r, :n], alone, atol=1e-4, rtol=1e-4)
            assert torch.isneginf(together[r, n:]).all()
    torch.testing.assert_close(together, again, atol=1e-5, rtol=1e-5)


def test_distance_buckets():
    d = torch.arange(0, 10000)
    b = distance_buckets(d, 32, 4096)
    assert b[:16].tolist() == list(range(16))
    assert (b[1:] >= b[:-1]).all()
    assert int(b.max()) == 31 and int(b.min()) == 0
    assert distance_buckets(torch.tensor([-5]), 32, 4096).tolist() == [0]


def test_build_mask_from_the_registry():
    m, _ = make_tiny("tiny-gpt2", hidden=16, layers=1)
    assert mask_names(learned=True) == ["mlp", "cnn_mlp", "rnn", "birnn", "hidden_state", "residual"]
    assert mask_names(learned=False) == [
        "attention_score",
        "snapkv",
        "gemfilter",
        "identity",
        "none",
        "random",
        "recency",
        "self_information",
        "lexical",
        "oracle",
    ]
    assert isinstance(build_mask("mlp", m, hidden_size=8), MLPForgetMask)
    p = build_mask("birnn", m, hidden_size=8)
    assert isinstance(p, RNNForgetMask) and p.bidirectional
    assert not build_mask("rnn", m, hidden_size=8).bidirectional
    assert isinstance(build_mask("self_information", m), SelfInformationMask)
    # the random baseline draws from its own seeded generator: the same seed, the same subsets
    ids, attn = batch()
    a = build_mask("random", seed=3).greedy(ids, attn, keep_ratio=0.5)
    b = build_mask("random", seed=3).greedy(ids, attn, keep_ratio=0.5)
    assert torch.equal(a, b)
    with pytest.raises(ForgetfulError, match="unknown strategy 'transformer'"):
        build_mask("transformer", m)
    with pytest.raises(
        ForgetfulError, match="unknown strategy 'recency'; choose from mlp, cnn_mlp, rnn, birnn, hidden_state, residual"
    ):
        build_mask("recency", m, learned=True)
    with pytest.raises(ForgetfulError, match="needs a causal LM"):
        build_mask("self_information")
    with pytest.raises(ForgetfulError, match="kernel_size must be a positive odd number"):
        CNNMLPForgetMask(m, kernel_size=4)
    with pytest.raises(ForgetfulError, match="cell must be 'gru' or 'lstm'"):
        RNNForgetMask(m, cell="rnn")
    with pytest.raises(ForgetfulError, match="needs the base model"):
        MLPForgetMask()
    with pytest.raises(ForgetfulError, match="hidden_size must be positive"):
        MLPForgetMask(m, hidden_size=0)
    detached = MLPForgetMask(embed_dim=16, hidden_size=8)
    with pytest.raises(ForgetfulError, match="call policy.attach"):
        detached.keep_logits(torch.ones(1, 3, dtype=torch.long))
    assert detached.attach(m).keep_logits(torch.ones(1, 3, dtype=torch.long)).shape == (1, 3)


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LEARNED)
@pytest.mark.parametrize("mode", ["exact", "bernoulli"])
def test_sample_log_prob_is_differentiable(kind, mode, model):
    ids, attn = batch()  # padded rows and a fully padded row
    p = policy(kind, model)
    s = p.sample(
        ids, attn, keep_ratio=0.5, mode=mode, num_samples=3, keep_first=True, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(s.log_prob).all() and torch.isfinite(s.entropy).all()
    assert s.log_prob.requires_grad
    s.log_prob.sum().backward(retain_graph=True)
    grads = {n: q.grad for n, q in p.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # a residual policy's correction starts at zero (its last layer is 0): only that layer and the
    # prior's scale get gradient at first; every other policy's features do
    assert kind == "residual" or grads["proj.weight"].abs().sum() > 0
    assert grads["head." + str(len(p.head) - 1) + ".weight"].abs().sum() > 0
    # the entropy bonus (and in Bernoulli mode, the budget penalty) too
    p.zero_grad()
    extra = s.entropy.sum() + (s.expected_keep.sum() if s.expected_keep is not None else 0)
    extra.backward()
    assert all(torch.isfinite(q.grad).all() for q in p.parameters() if q.grad is not None)
    assert (p.log_scale if kind == "residual" else p.proj.weight).grad.abs().sum() > 0
    emb = model.get_input_embeddings().weight
    assert not any(q is emb for q in p.parameters())  # the base model's embeddings are not policy params


# ------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------

ROUND_TRIP = [
    ("mlp", lambda m: MLPForgetMask(m, hidden_size=HIDDEN)),
    ("cnn_mlp", lambda m: CNNMLPForgetMask(m, hidden_size=HIDDEN, kernel_size=7)),
    ("bilstm", lambda m: RNNForgetMask(m, hidden_size=HIDDEN, bidirectional=True, cell="lstm")),
    ("gru", lambda m: RNNForgetMask(m, hidden_size=HIDDEN)),
    ("hidden_state", lambda m: HiddenStateForgetMask(m, hidden_size=HIDDEN, layer=2, window=3)),
    (
        "residual",
        lambda m: ResidualForgetMask(m, hidden_size=HIDDEN, layer=2, window=3, prior="recency", unit="chunk:3"),
    ),
]


@pytest.mark.parametrize(("name", "factory"), ROUND_TRIP, ids=[r[0] for r in ROUND_TRIP])
def test_save_load_round_trip(name, factory, model, tmp_path):
    torch.manual_seed(5)
    p = factory(model)
    with torch.no_grad():
        for q in p.parameters():  # move away from the default init
            q.add_(0.1 * torch.randn_like(q))
    p.save_pretrained(tmp_path / "policy")
    files = sorted(f.name for f in (tmp_path / "policy").iterdir())
    assert files == ["policy.safetensors", "policy_config.json"]
    umask = os.umask(0)
    os.umask(umask)
    for f in files:  # readable like any other file the user writes (not mkstemp's 0600)
        assert (tmp_path / "policy" / f).stat().st_mode & 0o777 == 0o666 & ~umask
    cfg = json.loads((tmp_path / "policy" / "policy_config.json").read_text())
    assert cfg == p.config() and cfg["policy_type"] == p.name
    emb = model.get_input_embeddings().weight
    with safe_open(str(tmp_path / "policy" / "policy.safetensors"), "pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert keys == set(p.state_dict())
    assert not any("embed" in k and "distance" not in k for k in keys)
    assert tuple(emb.shape) not in shapes.values()

    q = LearnedForgetMask.from_pretrained(tmp_path / "policy", model)
    assert type(q) is type(p)
    assert q.config() == p.config()
    same = type(p).from_pretrained(tmp_path / "policy", model)
    ids, attn = batch()
    with torch.no_grad():
        assert torch.equal(p.keep_logits(ids, attn), q.keep_logits(ids, attn))
        assert torch.equal(p.keep_logits(ids, attn), same.keep_logits(ids, attn))
    for k, v in p.state_dict().items():
        assert torch.equal(v, q.state_dict()[k])


def test_from_pretrained_wrong_class_and_embedding_size(model, tmp_path):
    p = RNNForgetMask(model, hidden_size=HIDDEN)
    p.save_pretrained(tmp_path)
    with pytest.raises(ForgetfulError, match="holds a RNNForgetMask, not a MLPForgetMask"):
        MLPForgetMask.from_pretrained(tmp_path, model)
    small, _ = make_tiny("tiny-gpt2", hidden=16, layers=1)
    with pytest.raises(ForgetfulError, match="embeddings of size 32, but the model's are 16"):
        LearnedForgetMask.from_pretrained(tmp_path, small)
    with pytest.raises(ForgetfulError, match="embeddings of size 32, but the model's are 16"):
        p.attach(small)
    # without a base model it loads, but needs attach() before use
    loaded = LearnedForgetMask.from_pretrained(tmp_path)
    with pytest.raises(ForgetfulError, match="attach"):
        loaded.keep_logits(torch.ones(1, 3, dtype=torch.long))
    ids, attn = batch([5])
    torch.testing.assert_close(loaded.attach(model).keep_logits(ids, attn), p.keep_logits(ids, attn))


@pytest.fixture
def saved(model, tmp_path):
    MLPForgetMask(model, hidden_size=HIDDEN).save_pretrained(tmp_path)
    return tmp_path


def test_from_pretrained_corrupt_folder(model, saved, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ForgetfulError, match="is not a saved policy"):
        LearnedForgetMask.from_pretrained(empty, model)
    cfg = json.loads((saved / "policy_config.json").read_text())

    (saved / "policy_config.json").write_text('{"policy_type": "mlp", ')
    with pytest.raises(ForgetfulError, match="not valid JSON"):
        LearnedForgetMask.from_pretrained(saved, model)

    (saved / "policy_config.json").write_text(json.dumps(dict(cfg, policy_type="transformer")))
    with pytest.raises(ForgetfulError, match="unknown policy_type 'transformer'"):
        LearnedForgetMask.from_pretrained(saved, model)

    (saved / "policy_config.json").write_text(json.dumps(dict(cfg, kernel_size=3)))
    with pytest.raises(ForgetfulError, match="bad policy config"):
        LearnedForgetMask.from_pretrained(saved, model)

    (saved / "policy_config.json").write_text(json.dumps(cfg))
    weights = (saved / "policy.safetensors").read_bytes()
    (saved / "policy.safetensors").write_bytes(weights[:40])
    with pytest.raises(ForgetfulError, match="cannot read"):
        LearnedForgetMask.from_pretrained(saved, model)

    (saved / "policy.safetensors").unlink()
    with pytest.raises(ForgetfulError, match="is not a saved policy"):
        LearnedForgetMask.from_pretrained(saved, model)


def test_from_pretrained_state_dict_mismatch(model, tmp_path):
    MLPForgetMask(model, hidden_size=HIDDEN).save_pretrained(tmp_path / "a")
    CNNMLPForgetMask(model, hidden_size=HIDDEN).save_pretrained(tmp_path / "b")  # extra conv.* weights
    (tmp_path / "b" / "policy.safetensors").replace(tmp_path / "a" / "policy.safetensors")
    with pytest.raises(ForgetfulError, match="does not match MLPForgetMask"):
        LearnedForgetMask.from_pretrained(tmp_path / "a", model)


def test_from_pretrained_weights_of_another_size(model, saved):
    """BUG (see report): a config whose hidden_size does not match the weights raises torch's
    RuntimeError (size mismatch) from load_state_dict instead of a ForgetfulError."""
    cfg = json.loads((saved / "policy_config.json").read_text())
    (saved / "policy_config.json").write_text(json.dumps(dict(cfg, hidden_size=HIDDEN * 2)))
    with pytest.raises(ForgetfulError, match="does not match"):
        LearnedForgetMask.from_pretrained(saved, model)


@pytest.mark.parametrize(
    "content",
    [b"[]", b"null", b'"MLPForgetMask"', b"\xff\xfe\x00\x01garbage"],
    ids=["list", "null", "string", "binary"],
)
def test_from_pretrained_config_that_is_not_a_json_object(content, model, saved):
    """BUG (see report): valid JSON that is not an object gives TypeError/AttributeError, and
    non-UTF-8 bytes give UnicodeDecodeError, instead of a ForgetfulError."""
    (saved / "policy_config.json").write_bytes(content)
    with pytest.raises(ForgetfulError, match="policy_config.json"):
        LearnedForgetMask.from_pretrained(saved, model)


def test_a_policy_saved_under_the_old_file_names_gets_one_line_naming_the_fix(model, saved):
    (saved / "policy_config.json").rename(saved / "config.json")
    (saved / "policy.safetensors").rename(saved / "model.safetensors")
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(
        json.dumps({"policy_class": "MLPForgetMask", **{k: v for k, v in cfg.items() if k != "policy_type"}})
    )
    with pytest.raises(
        ForgetfulError,
        match="old file names config.json and model.safetensors: rename them to "
        "policy_config.json and policy.safetensors",
    ):
        LearnedForgetMask.from_pretrained(saved, model)


def test_a_model_folder_is_not_mistaken_for_a_policy(model, tiny_model_dir):
    with pytest.raises(ForgetfulError, match="is not a saved policy: it needs policy_config.json"):
        LearnedForgetMask.from_pretrained(tiny_model_dir, model)


@pytest.mark.parametrize("kind", ["identity", "none", *BUDGETED])
@pytest.mark.parametrize("mode", ["greedy", "exact", "bernoulli"])
def test_protected_tokens_are_always_kept_and_outside_the_budget(kind, mode, model):
    """A question after its passage is protected: every policy keeps it, and the budget is a share
    of the passage only."""
    lengths = [12, 9, 5]
    ids, attn = batch(lengths)
    protect = torch.zeros_like(attn, dtype=torch.bool)
    for r, n in enumerate(lengths):
        protect[r, n - 3 : n] = True  # the last three real tokens: the question
    p = policy(kind, model)
    g = torch.Generator().manual_seed(1)
    if mode == "greedy":
        keep = p.greedy(ids, attn, keep_ratio=0.5, protect=protect)
    else:
        keep = p.sample(ids, attn, keep_ratio=0.5, mode=mode, num_samples=2, generator=g, protect=protect).keep
    assert (keep & protect).sum(-1).eq(protect.sum(-1)).all(), "a protected token was forgotten"
    assert not (keep & ~attn.bool()).any(), "padding was kept"
    if mode != "bernoulli":
        passage = attn.bool() & ~protect
        expected = expected_counts(kind, passage.long(), 0.5, keep_first=True)
        assert torch.equal(
            (keep & passage).sum(-1).reshape(-1, len(lengths)),
            expected.expand(keep.sum(-1).reshape(-1, len(lengths)).shape),
        )


def test_hidden_state_policy_sees_the_question_after_a_token(model):
    """A passage token's score changes when only the question (the last tokens) changes: the
    embedding-only MLP policy cannot do that."""
    torch.manual_seed(0)
    hs, mlp = (
        HiddenStateForgetMask(model, hidden_size=HIDDEN, layer=2, window=3),
        MLPForgetMask(model, hidden_size=HIDDEN),
    )
    ids, attn = batch([10])
    other = ids.clone()
    other[0, -3:] = torch.tensor([7, 8, 9])
    with torch.no_grad():
        assert not torch.allclose(hs.keep_logits(ids, attn)[0, :5], hs.keep_logits(other, attn)[0, :5])
        assert torch.equal(mlp.keep_logits(ids, attn)[0, :5], mlp.keep_logits(other, attn)[0, :5])
    assert hs.extra_flops_per_token(10) > mlp.extra_flops_per_token(10)
    with pytest.raises(ForgetfulError, match="past the model's 2 layers"):
        HiddenStateForgetMask(model, layer=3)
