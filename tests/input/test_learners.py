"""The learners beside REINFORCE: the relaxed keep (exact expected budget, gradients through the LM)
and the supervised one (the oracle's keep sets as labels), at toy size."""

from __future__ import annotations

import pytest
import torch

from forgetful.errors import ForgetfulError
from forgetful.input.compression import budget_counts, eligible_tokens, free_budget
from forgetful.input.examples import load_forget_examples
from forgetful.input.learners import (
    LearnerRun,
    RelaxedConfig,
    RelaxedTrainer,
    SupervisedConfig,
    SupervisedTrainer,
    fit_policy,
    relaxed_keep,
    soft_topk,
)
from forgetful.input.policies import build_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_soft_topk_holds_the_budget_exactly_and_its_gradient_keeps_it():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 9, generator=g, requires_grad=True)
    weights = torch.tensor([[1.0, 2, 3, 1, 1, 0, 2, 1, 4]]).expand(4, -1)
    budget = torch.tensor([4.0, 0.5, 15.0, 30.0])  # the last is more than the row holds: everything
    for temperature in (1.0, 0.1, 0.01):
        p = soft_topk(scores, weights, budget, temperature)
        torch.testing.assert_close((weights * p).sum(-1), torch.tensor([4.0, 0.5, 15.0, 15.0]), atol=1e-4, rtol=0)
        assert (p[:, 5] == 0).all() and ((p >= 0) & (p <= 1)).all()
    (grad,) = torch.autograd.grad((weights * soft_topk(scores, weights, budget, 0.3)).sum(), scores)
    assert grad.abs().max() < 1e-5  # moving any score leaves the expected budget where it is
    (grad,) = torch.autograd.grad(soft_topk(scores, weights, budget, 0.3)[0, 0], scores)
    assert grad[0, 0] > 0 and (grad[0, 1:] <= 1e-7).all()  # raising a unit's score takes mass from the others
    # low temperature: the hard top-k by score
    p = soft_topk(scores.detach()[:1, :4], torch.ones(1, 4), torch.tensor([2.0]), 1e-3)
    top = scores.detach()[0, :4].topk(2).indices
    assert set((p[0] > 0.99).nonzero().flatten().tolist()) == set(top.tolist())


def test_relaxed_keep_is_log_probabilities_over_units():
    attn = torch.ones(2, 10, dtype=torch.bool)
    eligible, forced = eligible_tokens(attn, True)
    units = torch.tensor([[-1, 0, 0, 0, 1, 1, 2, 2, 2, 2]] * 2)
    k = free_budget(budget_counts(attn, keep_ratio=0.5, keep_first=True), eligible, forced)
    logits = torch.tensor([[0.0, 3, 3, 3, 0, 0, -1, -1, -1, -1]] * 2)
    log_keep, stats = relaxed_keep(logits, units, eligible, forced, k, 0.5)
    assert log_keep[:, 0].eq(0).all()  # token 0 is forced in
    assert (log_keep[:, 1] == log_keep[:, 2]).all() and (log_keep[:, 6] == log_keep[:, 9]).all()  # per unit
    expected = log_keep.exp()[:, 1:].sum(-1)
    torch.testing.assert_close(expected, k.float(), atol=1e-4, rtol=0)
    assert abs(stats["budget"] - 1.0) < 1e-4 and 0 < stats["entropy"] < 0.7


def _run(model, tok, steps=3, **kw):
    ds = load_forget_examples(None, tok, embedded_examples=24, seed=3)
    policy = build_mask("residual", model, prior="recency", unit="sentence", layer=1, hidden_size=8)
    return LearnerRun(
        policy=policy,
        lm=model,
        train=ds.select(range(16)),
        val=ds.select(range(16, 24)),
        keep_ratio=0.5,
        pad_token_id=tok.pad_token_id,
        steps=steps,
        batch_size=4,
        learning_rate=1e-2,
        eval_steps=2,
        progress=False,
        **kw,
    )


def test_the_relaxed_learner_trains_the_policy_through_the_frozen_lm(tiny_llama):
    model, tok = tiny_llama
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = _run(model, tok, steps=4)
    start = {k: v.clone() for k, v in run.policy.state_dict().items()}
    result = RelaxedTrainer(run, RelaxedConfig(temperature_start=1.0, temperature_end=0.1)).train()
    steps = [h for h in result.history if "loss" in h]
    assert [round(h["temperature"], 6) for h in steps] == [1.0, round(0.1 ** (1 / 3), 6), round(0.1 ** (2 / 3), 6), 0.1]
    assert all(abs(h["budget"] - 1) < 1e-3 for h in steps)  # the expected budget is exact at every step
    assert result.lm_tokens_forward == result.lm_tokens_backward > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the LM stays frozen
    evals = [h for h in result.history if h.get("eval")]
    assert [h["step"] for h in evals] == [0, 2, 4] and result.best_nll == min(h["eval_policy_nll"] for h in evals)
    if result.best_step:  # the kept version is the best step's, else the start's
        assert any(not torch.equal(v, run.policy.state_dict()[k]) for k, v in start.items())
    assert RelaxedTrainer.steps_for(100, 8, 1024, 32, 0.25) == round(100 * 8 * 288 / (2 * 1056))
    with pytest.raises(ForgetfulError, match="temperature_end <= temperature_start"):
        RelaxedConfig(temperature_start=0.1, temperature_end=0.5)


def test_the_supervised_learner_fits_the_oracle_labels(tiny_llama):
    model, tok = tiny_llama
    run = _run(model, tok, steps=3)
    trainer = SupervisedTrainer(run, SupervisedConfig(label_rows=8, label_rounds=1))
    result = trainer.train()
    assert result.extra["label_rows"] == 8 and result.lm_tokens_forward > 0 and result.lm_tokens_backward == 0
    losses = [h["listwise_loss"] for h in result.history if "listwise_loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    labelled = trainer.label(type(result)())
    batch, units, share, present = labelled[0]
    assert ((share >= 0) & (share <= 1)).all() and (share[~present] == 0).all()
    # the oracle kept exactly the budget: its unit shares add up to the kept eligible tokens
    from forgetful.input.units import unit_sizes

    eligible, _ = eligible_tokens(batch.context_mask, True, batch.protect_mask)
    kept = (share * unit_sizes(units, eligible)).sum(-1)
    k = budget_counts(batch.context_mask, keep_ratio=0.5, keep_first=True) - 1
    torch.testing.assert_close(kept, k.float())
    token_policy = build_mask("mlp", model, hidden_size=8)
    with pytest.raises(ForgetfulError, match="give the policy a unit"):
        SupervisedTrainer(LearnerRun(**{**run.__dict__, "policy": token_policy}))
    with pytest.raises(ForgetfulError, match="unknown learner"):
        fit_policy("evolution", run)
