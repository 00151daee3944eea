"""Units of selection: splitting, exact token budgets filled unit by unit, the Plackett-Luce
log-probability over units, residual policies that equal their prior, and the warm-start labels."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forgetful.errors import ForgetfulError
from forgetful.input.compression import budget_counts, eligible_tokens
from forgetful.input.policies import ResidualForgetMask, build_mask, query_mask
from forgetful.input.policies.residual import standardise
from forgetful.input.units import (
    check_unit,
    sentence_end_table,
    sentence_ids,
    unit_gumbel_keep,
    unit_ids,
    unit_scores,
    unit_topk_keep,
    whole_units_kept,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------
# splitting
# ------------------------------------------------------------------------------------------


def test_sentences_split_after_the_tokenizers_own_sentence_ends(tiny_llama):
    _, tok = tiny_llama
    text = "Mira was born in Lisbon. She writes novels! Does she paint? Yes"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    sent = sentence_ids(ids, sentence_end_table(tok))
    pieces = [tok.decode([i for i, s in zip(ids, sent) if s == k]).strip() for k in range(int(sent.max()) + 1)]
    assert pieces == ["Mira was born in Lisbon.", "She writes novels!", "Does she paint?", "Yes"]
    assert (np.diff(sent) >= 0).all() and sent[0] == 0
    assert sentence_ids([], sentence_end_table(tok)).size == 0


def test_unit_ids_of_each_kind():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert unit_ids("token", mask) is None
    assert unit_ids("chunk:2", mask).tolist() == [[0, 0, 1, 1, 2, -1]]
    sentences = torch.tensor([[0, 0, 1, 1, 1, -1]])
    assert unit_ids("sentence", mask, sentence_ids=sentences).tolist() == [[0, 0, 1, 1, 1, -1]]
    task = torch.tensor([[-1, 0, 0, 1, -1, -1]])
    assert unit_ids("task", mask, task_units=task).tolist() == [[-1, 0, 0, 1, -1, -1]]
    with pytest.raises(ForgetfulError, match="needs sentence ids"):
        unit_ids("sentence", mask)
    with pytest.raises(ForgetfulError, match="units declared by its task"):
        unit_ids("task", mask)
    for bad in ("chunk:0", "chunk", "page", "chunk:x"):
        with pytest.raises(ForgetfulError, match="unknown unit"):
            check_unit(bad)


# ------------------------------------------------------------------------------------------
# exact budgets, filled unit by unit
# ------------------------------------------------------------------------------------------


def test_greedy_takes_whole_units_by_mean_score_and_the_last_in_part():
    scores = torch.tensor([[0.0, 5.0, 5.0, 1.0, 1.0, 1.0, 9.0, -9.0]])
    units = torch.tensor([[0, 1, 1, 2, 2, 2, 3, 3]])  # unit means: 0, 5, 1, 0
    attn = torch.ones_like(units, dtype=torch.bool)
    eligible, forced = eligible_tokens(attn, True, None)
    k = torch.tensor([5])  # token 0 forced, 4 free: unit 1 (2 tokens), then 2 of unit 2's 3
    keep = unit_topk_keep(scores, units, k, eligible, forced)
    assert keep.int().tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 14), min_size=1, max_size=4),
    forget_p=st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]),
    size=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_unit_samplers_keep_exactly_the_budget(lengths, forget_p, size, seed):
    n = max(max(lengths), 1)
    g = torch.Generator().manual_seed(seed)
    attn = torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    protect = (torch.rand(attn.shape, generator=g) < 0.2) & attn
    units = unit_ids(f"chunk:{size}", attn)
    eligible, forced = eligible_tokens(attn, True, protect)
    k = budget_counts(attn, keep_ratio=1 - forget_p, keep_first=True, protect=protect)
    logits = torch.randn(attn.shape, generator=g)
    greedy = unit_topk_keep(logits, units, k, eligible, forced)
    sample = unit_gumbel_keep(logits, units, k, eligible, forced, num_samples=3, generator=g)
    for keep in (greedy, *sample.keep):
        assert torch.equal((keep & attn).sum(-1), k)
        assert not (keep & ~attn).any() and (keep | ~forced).all()
    assert torch.isfinite(sample.log_prob).all() and (sample.log_prob <= 1e-6).all()


def _manual_unit_log_prob(unit_logits: list[float], order: list[int], touched: int) -> float:
    left, total = list(range(len(unit_logits))), 0.0
    for u in order[:touched]:
        z = sum(math.exp(unit_logits[v]) for v in left)
        total += unit_logits[u] - math.log(z)
        left.remove(u)
    return total


def test_unit_log_prob_is_plackett_luce_of_the_units_touched():
    # 4 units of sizes 1, 2, 3, 2 after the forced token 0
    units = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 3, 3]])
    token_logits = torch.tensor([[0.0, 0.3, -0.2, 0.6, 1.0, 1.0, 1.0, -0.5, 0.1]])
    attn = torch.ones_like(units, dtype=torch.bool)
    eligible, forced = eligible_tokens(attn, True, None)
    means = unit_scores(token_logits, units, eligible)[0, :4].tolist()  # unit 0 holds only token 1 then
    assert means == pytest.approx([0.3, 0.2, 1.0, -0.2])
    k = torch.tensor([5])  # 4 free tokens
    for seed in range(20):
        s = unit_gumbel_keep(token_logits, units, k, eligible, forced, generator=torch.Generator().manual_seed(seed))
        keep = s.keep[0, 0]
        # recover the order of units from the keep set: whole units, then at most one in part
        sizes = {0: 1, 1: 2, 2: 3, 3: 2}
        kept = {u: int(keep[units[0] == u].sum() - (1 if u == 0 else 0)) for u in range(4)}
        whole = [u for u in range(4) if kept[u] == sizes[u]]
        part = [u for u in range(4) if 0 < kept[u] < sizes[u]]
        assert sum(kept.values()) == 4 and len(part) <= 1
        touched = len(whole) + len(part)
        # the exact probability of this keep set's ordered prefix: sum over the orders of the whole
        # units (the part-kept one, if any, came last) of the Plackett-Luce probability
        prefixes = [(*p, *part) for p in itertools.permutations(whole)]
        logs = [_manual_unit_log_prob(means, list(p), touched) for p in prefixes]
        assert any(math.isclose(float(s.log_prob[0, 0]), lp, abs_tol=1e-5) for lp in logs)
    # the entropy is that of the first draw's softmax over units
    probs = torch.softmax(torch.tensor(means), 0)
    assert float(s.entropy[0]) == pytest.approx(float(-(probs * probs.log()).sum()), abs=1e-5)


def test_unit_sample_frequencies_follow_plackett_luce():
    """With a budget of one whole unit, the sampled unit is drawn from softmax(unit means)."""
    units = torch.tensor([[0, 0, 1, 1, 2, 2]])
    token_logits = torch.tensor([[0.5, 0.5, -1.0, -1.0, 1.5, 1.5]])
    attn = torch.ones_like(units, dtype=torch.bool)
    eligible, forced = eligible_tokens(attn, False, None)
    s = unit_gumbel_keep(
        token_logits, units, torch.tensor([2]), eligible, forced, 20000, torch.Generator().manual_seed(0)
    )
    first = s.keep[:, 0].float().view(20000, 3, 2)[..., 0].mean(0)
    expected = torch.softmax(torch.tensor([0.5, -1.0, 1.5]), 0)
    assert torch.allclose(first, expected, atol=0.015)
    assert torch.allclose(s.log_prob[:, 0].exp().unique(), torch.sort(expected).values, atol=1e-5)


def test_whole_units_kept():
    keep = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    marked = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert whole_units_kept(keep, marked, torch.ones_like(keep)).tolist() == [False, True]


# ------------------------------------------------------------------------------------------
# baselines and the residual policy on units
# ------------------------------------------------------------------------------------------


def _qa_batch(vocab=300, seed=0):
    """Two right-padded rows: a passage of 4 sentences, then a protected question."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, 24), generator=g)
    attn = torch.ones(2, 24, dtype=torch.bool)
    attn[1, 20:] = False
    protect = torch.zeros_like(attn)
    protect[0, 18:] = True
    protect[1, 15:20] = True
    protect[:, 0] = True
    ids[0, 19:21] = ids[0, 5:7]  # the question of row 0 repeats two tokens of its unit 1
    units = torch.tensor([[-1] + [0] * 4 + [1] * 4 + [2] * 4 + [3] * 5 + [-1] * 6] * 2)
    return ids, attn, protect, units


def test_lexical_overlap_scores_rare_words_shared_with_the_question():
    ids, attn, protect, units = _qa_batch()
    lex = build_mask("lexical@task")
    query = query_mask(attn, protect, 32)
    assert query[0].nonzero().flatten().tolist() == list(range(18, 24))  # protected after the passage
    scores = lex.keep_logits(ids, attn, protect=protect)
    passage = [t for t in range(1, 18) if t not in (5, 6)]
    assert float(scores[0, 5:7].min()) > float(scores[0, passage].max()) + 0.1  # the tokens the question repeats
    keep = lex.greedy(ids, attn, keep_ratio=0.25, protect=protect, units=units)
    assert keep[0, 5:9].all()  # unit 1 first


def test_residual_policy_equals_its_prior_before_training(tiny_llama):
    model, _ = tiny_llama
    ids, attn, protect, units = _qa_batch()
    for prior in ("lexical", "recency", "attention_score"):
        torch.manual_seed(0)
        policy = ResidualForgetMask(model, prior=prior, unit="task", layer=1, hidden_size=8)
        with torch.no_grad():
            got = policy.keep_logits(ids, attn, protect=protect, units=units)
            query = query_mask(attn, protect, policy.window)
            cand = attn & ~query & ~protect
            cand[:, 0] = False
            raw = build_mask(prior, model, window=policy.window) if prior != "recency" else build_mask(prior)
            expected = 2.0 * standardise(raw.keep_logits(ids, attn, protect=protect), cand)
        assert torch.equal(got, expected.masked_fill(~attn, float("-inf"))), prior  # bit-equal
        same = raw.with_unit("task").greedy(ids, attn, keep_ratio=0.5, protect=protect, units=units)
        assert torch.equal(policy.greedy(ids, attn, keep_ratio=0.5, protect=protect, units=units), same)
    with pytest.raises(ForgetfulError, match="prior must be one of"):
        ResidualForgetMask(model, prior="random")


def test_residual_policy_reads_the_question(tiny_llama):
    """Changing only the (protected) question changes the passage's keep-logits, once the
    correction is not zero."""
    model, _ = tiny_llama
    torch.manual_seed(0)
    policy = ResidualForgetMask(model, prior="recency", unit="task", layer=1, hidden_size=8)
    torch.nn.init.normal_(policy.head[-1].weight)
    ids, attn, protect, units = _qa_batch()
    other = ids.clone()
    other[0, 19:23] = torch.tensor([7, 8, 9, 10])
    with torch.no_grad():
        a = policy.keep_logits(ids, attn, protect=protect, units=units)
        b = policy.keep_logits(other, attn, protect=protect, units=units)
    assert not torch.allclose(a[0, 1:18], b[0, 1:18])
    assert torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------
# the warm start
# ------------------------------------------------------------------------------------------


def test_leave_one_unit_out_labels_equal_a_manual_computation(tiny_llama):
    from forgetful.input.compression import compress_examples
    from forgetful.input.examples import ForgetBatch
    from forgetful.input.supervision import leave_one_unit_out
    from forgetful.nll import token_nll

    model, tok = tiny_llama
    model = copy.deepcopy(model).eval()
    ids, attn, protect, units = _qa_batch(vocab=len(tok))
    target = torch.randint(5, len(tok) - 1, (2, 3), generator=torch.Generator().manual_seed(1))
    batch = ForgetBatch(ids, attn, target, torch.ones_like(target, dtype=torch.bool), protect_mask=protect)
    labels, present = leave_one_unit_out(model, batch, units, pad_token_id=0, rows_per_forward=3)
    assert present[:, :4].all() and not present[:, 4:].any()

    def nll(keep):
        inputs = compress_examples(ids, attn, keep, target, batch.target_mask, 0)
        out = token_nll(
            model,
            inputs["input_ids"],
            inputs["labels"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            target_length=inputs["target_length"],
        )
        return out.sum_per_row() / out.count_per_row()

    with torch.no_grad():
        full = nll(attn)
        for u in range(4):
            manual = nll(attn & ((units != u) | protect)) - full  # protected tokens always stay
            torch.testing.assert_close(labels[:, u], manual, atol=1e-5, rtol=1e-5)


def test_the_warm_start_fits_the_policy_to_its_labels(tiny_llama):
    from forgetful.input.examples import ForgetBatch
    from forgetful.input.supervision import leave_one_unit_out, warm_start

    model, tok = tiny_llama
    model = copy.deepcopy(model).eval()
    ids, attn, protect, units = _qa_batch(vocab=len(tok))
    target = torch.randint(5, len(tok) - 1, (2, 3), generator=torch.Generator().manual_seed(1))
    batch = ForgetBatch(
        ids, attn, target, torch.ones_like(target, dtype=torch.bool), protect_mask=protect, unit_ids=units
    )
    torch.manual_seed(0)
    policy = ResidualForgetMask(model, prior="recency", unit="task", layer=1, hidden_size=16)
    result = warm_start(policy, model, [batch], pad_token_id=0, steps=60, learning_rate=3e-2, progress=False)
    losses = [h["listwise_loss"] for h in result.history]
    assert result.rows == 2 and len(losses) == 60 and losses[-1] < 0.5 * losses[0]
    labels, present = leave_one_unit_out(model, batch, units, pad_token_id=0)
    eligible, _ = eligible_tokens(attn, True, protect)
    with torch.no_grad():
        scores = unit_scores(policy.keep_logits(ids, attn, protect=protect, units=units), units, eligible)
    for r in range(2):  # the unit the target needs most is now the policy's first choice
        assert int(scores[r, :4].argmax()) == int(labels[r, :4].argmax())
    with pytest.raises(ForgetfulError, match="a token policy has too many"):
        warm_start(build_mask("residual", model, unit="token", layer=1), model, [batch], pad_token_id=0, steps=1)


def test_lexical_overlap_marks_every_id_of_the_query_wherever_else_it_occurs():
    """An id that occurs in the query and elsewhere is a query id: the mark is a sum, not a plain
    scatter whose last write would decide (CUDA leaves the order open)."""
    from forgetful.input.policies import lexical_scores

    ids = torch.tensor([[1, 7, 8, 9, 7, 2, 7, 3]])
    attn = torch.ones_like(ids, dtype=torch.bool)
    query = torch.tensor([[0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)  # the query comes first here
    scores = lexical_scores(ids, attn, query, doc_tokens=2)
    matched = scores[0, [4, 6]]
    others = scores[0, [0, 2, 3, 5, 7]]
    assert float(matched.min()) > float(others.max()) + 0.1


def test_bad_unit_and_residual_options_are_one_clear_error(tiny_llama, tmp_path):
    """Each new way to misuse units, the residual policy, the trainer's new options or the
    experiment's policy stage fails at once with one line that names the fix."""
    from forgetful.input.experiment import validation_split
    from forgetful.input.policies import AttentionScoreMask, LexicalOverlapMask
    from forgetful.input.policy_training import load_policy
    from forgetful.input.reinforce import ForgetTrainingConfig
    from forgetful.input.reinforce_config import phases

    model, _ = tiny_llama
    ids, attn, protect, units = _qa_batch()
    chunks = build_mask("recency@chunk:4")
    with pytest.raises(
        ForgetfulError, match="bernoulli mode keeps tokens one by one; a chunk:4 policy needs mode exact"
    ):
        chunks.sample(ids, attn, keep_ratio=0.5, mode="bernoulli")
    with pytest.raises(ForgetfulError, match=r"units have shape \(2, 3\) but input_ids has \(2, 24\)"):
        chunks.with_unit("task").greedy(ids, attn, keep_ratio=0.5, units=units[:, :3])
    for kwargs, message in (
        ({"layer": 9}, "layer 9 is past the model's 2 layers"),
        ({"layer": -1}, "layer must be >= 0"),
        ({"prior_scale": 0.0}, "prior_scale must be positive"),
        ({"unit": "page"}, "unknown unit 'page'"),
    ):
        with pytest.raises(ForgetfulError, match=message):
            ResidualForgetMask(model, **kwargs)
    with pytest.raises(ForgetfulError, match="pooling must be avg or max"):
        AttentionScoreMask(model, pooling="median")
    with pytest.raises(ForgetfulError, match="window, doc_tokens, rounds and seed_units must be at least 1"):
        LexicalOverlapMask(window=0)
    with pytest.raises(ForgetfulError, match="freeze_lm and freeze_policy together train nothing"):
        ForgetTrainingConfig(freeze_lm=True, freeze_policy=True)
    with pytest.raises(ForgetfulError, match="freeze_policy leaves no epoch that trains the LM"):
        phases("two_step", ResidualForgetMask(model, layer=1), [False], False, freeze_policy=True)
    with pytest.raises(
        ForgetfulError, match=r"no trained residual policy \(relaxed, seed 1\) for keep 0.5 .* run its policy run first"
    ):
        load_policy(tmp_path, "residual", "relaxed", 1, 0.5, model)
    from datasets import Dataset

    rows = Dataset.from_dict({"context_ids": [[1, 2]] * 4, "target_ids": [[3]] * 4})
    with pytest.raises(ForgetfulError, match=r"val_examples \(4\) must leave training rows \(4 in all\)"):
        validation_split(rows, 4, seed=0)
    with pytest.raises(ForgetfulError, match="val_examples must be at least 1"):
        validation_split(rows, 0, seed=0)


def test_keep_best_needs_held_out_rows(tiny_llama):
    from forgetful.input.examples import load_forget_examples
    from forgetful.input.reinforce import ForgetTrainingConfig, reinforce_model

    model, tok = tiny_llama
    train = load_forget_examples(None, tok, embedded_examples=8, seed=0)
    with pytest.raises(ForgetfulError, match="keep_best needs an eval_dataset"):
        reinforce_model(
            copy.deepcopy(model),
            ResidualForgetMask(model, layer=1, hidden_size=8),
            forget_p=0.5,
            exploration_epochs=[0.0],
            train_dataset=train,
            tokenizer=tok,
            args=ForgetTrainingConfig(keep_best=True, per_device_train_batch_size=4, disable_tqdm=True),
        )
