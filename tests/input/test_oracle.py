"""The oracle (headroom): exact budgets, never worse than where it starts, against an exhaustive search."""

from __future__ import annotations

import pytest
import torch

from forgetful.errors import ForgetfulError
from forgetful.input.compression import compress_examples, compressed_nll, eligible_tokens
from forgetful.input.evaluation import choose_keep, evaluate_strategy
from forgetful.input.examples import ForgetBatch
from forgetful.input.policies import build_mask, keep_sets_by_units

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(vocab: int, rows: int = 4, n: int = 18, m: int = 4, seed: int = 0) -> ForgetBatch:
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(3, vocab, (rows, n), generator=g)
    tgt = torch.randint(3, vocab, (rows, m), generator=g)
    ctx[:, 7:9] = tgt[:, :2]  # something in the context worth keeping
    return ForgetBatch(ctx, torch.ones_like(ctx, dtype=torch.bool), tgt, torch.ones_like(tgt, dtype=torch.bool))


def _row_nll(model, batch, keep):
    inputs = compress_examples(batch.context_ids, batch.context_mask, keep, batch.target_ids, batch.target_mask)
    with torch.no_grad():
        return compressed_nll(model, inputs).mean_per_row()


def test_keep_sets_by_units_are_every_filling_of_the_budget():
    units = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    attn = torch.ones(1, 10, dtype=torch.bool)
    eligible, forced = eligible_tokens(attn, True)
    sets = keep_sets_by_units(units, eligible[0], forced[0], 4)
    assert (sets.sum(1) == 5).all()  # 4 chosen + token 0
    assert sets[:, 0].all()
    # {0 (3 tokens) + 1 of unit 1}, {0 + 1 of 2}, {1 whole + 2 of 0}, {1 + 2 of 2}, {2 whole}, {1 (2) + ...}
    as_sets = {tuple(torch.nonzero(s).flatten().tolist()) for s in sets}
    assert (0, 1, 2, 3, 4) in as_sets and (0, 6, 7, 8, 9) in as_sets and (0, 4, 5, 1, 2) not in as_sets
    assert (0, 1, 2, 4, 5) in as_sets  # unit 1 whole, unit 0 in part
    assert len(as_sets) == len(sets)
    # tokens outside every unit: no enumeration
    assert (
        keep_sets_by_units(
            torch.tensor([-1, 0, 0, -1, 1]), torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool), 2
        )
        is None
    )


def test_the_oracle_reaches_the_exhaustive_optimum_and_beats_its_start(tiny_llama):
    model, _ = tiny_llama
    model.eval()
    batch = _batch(model.config.vocab_size)
    keep_ratio, unit = 0.4, "chunk:3"  # 18 tokens: 7 kept, token 0 and 6 of the 17 others in 6 units
    eligible, forced = eligible_tokens(batch.context_mask, True)
    units = batch.units(unit)
    best = []
    for b in range(len(batch)):
        k_free = 6
        sets = keep_sets_by_units(units[b], eligible[b], forced[b], k_free)
        assert keep_sets_by_units(units[b], eligible[b], forced[b], k_free, limit=len(sets) - 1) is None
        rows = batch.select(slice(b, b + 1))
        nll = _row_nll(
            model,
            ForgetBatch(
                *(
                    t.expand(len(sets), -1)
                    for t in (rows.context_ids, rows.context_mask, rows.target_ids, rows.target_mask)
                )
            ),
            sets,
        )
        best.append(float(nll.min()))
    best = torch.tensor(best)
    others = {}
    for spec in ("recency@" + unit, "random@" + unit, "lexical@" + unit, "identity", "none"):
        mask = build_mask(spec, model, seed=1)
        others[spec] = _row_nll(model, batch, choose_keep(mask, batch, keep_ratio=keep_ratio))
    local = build_mask(f"oracle:exhaustive=0,rounds=6@{unit}", model)
    local_keep = choose_keep(local, batch, keep_ratio=keep_ratio)
    exact = build_mask(f"oracle:exhaustive=1000@{unit}", model)  # few keep sets: searched exhaustively
    exact_keep = choose_keep(exact, batch, keep_ratio=keep_ratio)
    assert (local_keep.sum(1) == 7).all() and (exact_keep.sum(1) == 7).all()  # the exact budget
    assert exact.last_stats["exhaustive_rows"] == len(batch)
    torch.testing.assert_close(_row_nll(model, batch, exact_keep), best, atol=1e-5, rtol=0)
    found = _row_nll(model, batch, local_keep)
    start = others["recency@" + unit]
    for spec in ("recency@" + unit, "random@" + unit, "lexical@" + unit):
        assert (best <= others[spec] + 1e-5).all(), spec  # nothing of this budget beats the optimum
    assert (found <= start + 1e-5).all()  # never worse than where it starts
    assert (found >= best - 1e-5).all()
    torch.testing.assert_close(torch.tensor(local.last_stats["oracle_nll"]), found, atol=1e-5, rtol=0)
    gap = float((found - best).max())
    print(f"local search vs exhaustive: largest gap {gap:.4f} nats over {len(batch)} rows")
    assert gap < 0.05  # six units, six rounds: the local search gets (close to) the optimum


def test_the_oracle_is_scored_apart_and_refuses_tokens(tiny_llama):
    model, _ = tiny_llama
    batch = _batch(model.config.vocab_size, rows=2)
    with pytest.raises(ForgetfulError, match="searches over units"):
        choose_keep(build_mask("oracle", model), batch, keep_ratio=0.5)
    with pytest.raises(ForgetfulError, match="needs the causal LM"):
        build_mask("oracle@chunk:3")
    with pytest.raises(ForgetfulError, match="reads the target"):
        build_mask("oracle@chunk:3", model).greedy(batch.context_ids)
    with pytest.raises(ForgetfulError, match="starts from a baseline"):
        build_mask("oracle:start=oracle@chunk:3", model)
    res = evaluate_strategy(model, build_mask("oracle@chunk:3", model), [batch], keep_ratio=0.5, pad_token_id=0)
    assert res["oracle"]["rows"] == 2 and res["oracle"]["oracle_nll"] <= res["oracle"]["start_nll"] + 1e-6
