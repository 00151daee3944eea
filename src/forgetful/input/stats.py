"""Paired comparisons of strategies scored on the same held-out rows.

The independent units are **groups** of rows: an author's questions (TOFU-QA, multi-hop) or a
block of contiguous text windows; a row without a group is its own. Every statistic is a function
of the per-group sums of target NLL and target tokens (``per_example`` dicts of
:func:`~forgetful.input.evaluation.evaluate_strategy`: ``nll_sum``, ``tokens``, ``group``, and
``unread_sum`` / ``unread_tokens`` for the tokens after the target):

* :func:`paired_bootstrap` - the difference of token-weighted mean NLLs and its percentile
  interval, resampling whole groups, the same groups for both strategies;
* :func:`sign_flip_p` - the two-sided p of that difference under exchangeability within groups
  (``scipy.stats.permutation_test`` flips the sign of each group's difference; exact where
  ``2**groups`` resamples fit, else Monte Carlo, and it says which);
* :func:`gap_closed` - the share of the headroom a strategy closes, ``(base - x) / (base - oracle)``,
  with one resampling shared by all three.
"""

from __future__ import annotations

import inspect

import numpy as np

from ..errors import ForgetfulError

NLL = ("nll_sum", "tokens")
UNREAD = ("unread_sum", "unread_tokens")


def _rows(d: dict, rows: int | None) -> dict:
    return d if rows is None else {k: (v[:rows] if isinstance(v, list) else v) for k, v in d.items()}


def group_sums(examples: list[dict], *, keys: tuple[str, str] = NLL, rows: int | None = None):
    """``(sums [k, G], tokens [k, G])`` of ``k`` strategies over the groups of their rows (the first
    ``rows`` rows of each, when given). Raises if the strategies were not scored on the same rows."""
    picked = [_rows(d, rows) for d in examples]
    groups = np.asarray(picked[0]["group"])
    for d in picked[1:]:
        if len(d["group"]) != len(groups) or (np.asarray(d["group"]) != groups).any():
            raise ForgetfulError("paired comparison: the strategies were not scored on the same examples")
    missing = [k for k in keys for d in picked if k not in d]
    if missing:
        raise ForgetfulError(f"paired comparison: the rows have no {missing[0]} (scored without those tokens)")
    groups = np.where(groups < 0, -1 - np.arange(len(groups)), groups)  # ungrouped rows: each its own
    _, index = np.unique(groups, return_inverse=True)
    count = int(index.max()) + 1 if len(index) else 0

    def per_group(key):
        return np.stack([np.bincount(index, np.asarray(d[key], dtype=np.float64), minlength=count) for d in picked])

    return per_group(keys[0]), per_group(keys[1])


def _resampled_means(sums, tokens, resamples: int, seed: int) -> np.ndarray:
    """``[R, k]`` token-weighted means under ``resamples`` bootstrap draws of the groups."""
    count = sums.shape[1]
    rng = np.random.default_rng(seed)
    picks = rng.multinomial(count, np.full(count, 1.0 / count), size=resamples).astype(np.float64)
    return (picks @ sums.T) / np.maximum(picks @ tokens.T, 1e-12)


def paired_bootstrap(
    a: dict,
    b: dict,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    keys: tuple[str, str] = NLL,
    rows: int | None = None,
) -> tuple[float, float, float]:
    """``(difference, low, high)``: the token-weighted mean NLL of ``a`` minus that of ``b`` on the
    same examples and its ``level`` percentile interval from resampling whole groups, paired (one
    resample picks the same groups for both)."""
    sums, tokens = group_sums([a, b], keys=keys, rows=rows)
    point = sums[0].sum() / tokens[0].sum() - sums[1].sum() / tokens[1].sum()
    means = _resampled_means(sums, tokens, resamples, seed)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means[:, 0] - means[:, 1], [tail, 100 - tail])
    return float(point), float(low), float(high)


def sign_flip_p(
    a: dict, b: dict, *, keys: tuple[str, str] = NLL, rows: int | None = None, resamples: int = 100_000, seed: int = 0
) -> tuple[float, bool]:
    """``(p, exact)``: two-sided p of "a and b are exchangeable within each group" for the
    difference of their summed NLLs (flipping the sign of each group's difference), from
    ``scipy.stats.permutation_test``; exact when ``2**groups <= resamples``."""
    from scipy.stats import permutation_test

    sums, _ = group_sums([a, b], keys=keys, rows=rows)
    diff = sums[0] - sums[1]
    if len(diff) < 2:
        return 1.0, True
    # scipy >= 1.15 names the generator ``rng``, older releases ``random_state``
    seeded = "rng" if "rng" in inspect.signature(permutation_test).parameters else "random_state"
    result = permutation_test(
        (diff,),
        lambda x, axis: np.sum(x, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=resamples,
        alternative="two-sided",
        **{seeded: np.random.default_rng(seed)},
    )
    return float(result.pvalue), 2 ** len(diff) <= resamples


def compare(a: dict, b: dict, *, resamples: int = 2000, seed: int = 0, keys=NLL, rows: int | None = None) -> dict:
    """``a`` against ``b``: ``diff``, ``ci95``, ``p`` (sign flip), ``p_exact`` and ``groups``."""
    diff, low, high = paired_bootstrap(a, b, resamples=resamples, seed=seed, keys=keys, rows=rows)
    p, exact = sign_flip_p(a, b, keys=keys, rows=rows, seed=seed)
    return {
        "diff": diff,
        "ci95": [low, high],
        "p": p,
        "p_exact": exact,
        "groups": group_sums([a], rows=rows)[0].shape[1],
    }


def gap_closed(
    base: dict, learned: dict, oracle: dict, *, resamples: int = 2000, seed: int = 0, keys=NLL, rows: int | None = None
) -> dict:
    """The share of the headroom ``learned`` closes, ``(base - learned) / (base - oracle)``, with the
    headroom ``base - oracle`` and both intervals from one resampling of the groups. The share is
    None where the headroom's interval does not exclude 0 (nothing to close that anyone can tell)."""
    sums, tokens = group_sums([base, learned, oracle], keys=keys, rows=rows)
    point = sums.sum(1) / tokens.sum(1)
    means = _resampled_means(sums, tokens, resamples, seed)
    room = means[:, 0] - means[:, 2]
    room_ci = np.percentile(room, [2.5, 97.5])
    out = {"headroom": float(point[0] - point[2]), "headroom_ci95": [float(room_ci[0]), float(room_ci[1])]}
    if room_ci[0] > 0 or room_ci[1] < 0:
        share = (means[:, 0] - means[:, 1]) / room
        low, high = np.percentile(share, [2.5, 97.5])
        out.update(
            gap_closed=float((point[0] - point[1]) / (point[0] - point[2])), gap_closed_ci95=[float(low), float(high)]
        )
    else:
        out.update(gap_closed=None, gap_closed_ci95=None)
    return out
