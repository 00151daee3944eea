"""The REINFORCE core, free of any training loop: baselines, advantages and the policy loss.

A policy draws ``K`` keep sets per context (exact budgets: Plackett-Luce over tokens or units, see
:mod:`~forgetful.input.compression` and :mod:`~forgetful.input.units`); each gets the reward
``r = -NLL(target)`` from the LM. The gradient estimate is ``-(r - b) * grad log pi(K)``, with

* ``rloo``: the leave-one-out baseline, ``b_k = mean of the other K - 1 rewards of the same
  context`` (unbiased, no learned critic; Kool et al. 2019, "Buy 4 REINFORCE samples, get a
  baseline for free");
* ``moving_average``: one running mean of the reward.

Advantages are then normalised over the (global) batch; an entropy bonus keeps sampling alive.
Everything is written for ``[K, B]`` tensors and an optional ``reduce`` (sum over processes), so one
process and N processes compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def rloo_baseline(reward: torch.Tensor) -> torch.Tensor:
    """``[K, B]``: for each sample, the mean reward of the other ``K - 1`` samples of its context."""
    k = reward.shape[0]
    if k < 2:
        raise ValueError("the leave-one-out baseline needs at least two samples per context")
    return (reward.sum(0, keepdim=True) - reward) / (k - 1)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor, reduce: Reduce = _identity) -> torch.Tensor:
    """Mean of ``values`` weighted by ``weight`` (both broadcast to one shape), over every process."""
    w = weight.float().expand_as(values)
    stats = reduce(torch.stack([(values * w).sum(), w.sum()]))
    return stats[0] / stats[1].clamp(min=1)


def normalise(adv: torch.Tensor, weight: torch.Tensor, reduce: Reduce = _identity) -> torch.Tensor:
    """``(adv - mean) / std`` over the samples with weight (the policy's own), over every process."""
    w = weight.float().expand_as(adv)
    stats = reduce(torch.stack([(adv * w).sum(), (adv * adv * w).sum(), w.sum()]))
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    var = (stats[1] / n - mean * mean).clamp(min=0)
    return (adv - mean) / (var.sqrt() + 1e-6)


def policy_gradient_loss(
    advantage: torch.Tensor,
    log_prob: torch.Tensor,
    entropy: torch.Tensor,
    own: torch.Tensor,
    *,
    samples: float,
    rows: float,
    entropy_coef: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """``-(A * log pi)`` summed over the policy's own samples / ``samples``, minus ``entropy_coef``
    times the entropy summed over its own rows / ``rows`` (global counts), times ``scale`` (the
    number of processes, whose gradients are averaged)."""
    w = own.float().view(1, -1)
    pg = -(advantage.detach() * log_prob * w).sum() / samples
    ent = (entropy * own.float()).sum() / rows
    return (pg - entropy_coef * ent) * scale


def listwise_loss(
    scores: torch.Tensor, labels: torch.Tensor, present: torch.Tensor, temperature: float
) -> torch.Tensor:
    """ListNet: cross-entropy from ``softmax(labels / temperature)`` to ``softmax(scores)`` over the
    ``present`` entries of each row (``[B, U]``), mean over rows that have two or more. The first
    draw of a Plackett-Luce policy is ``softmax(scores)``: this fits it to the labels' ranking."""
    neg = torch.finfo(torch.float32).min
    target = torch.softmax((labels.float() / temperature).masked_fill(~present, neg), dim=-1)
    logp = torch.log_softmax(scores.float().masked_fill(~present, neg), dim=-1)
    per_row = -(target * logp).masked_fill(~present, 0.0).sum(-1)
    used = present.sum(-1) >= 2
    return (per_row * used.float()).sum() / used.sum().clamp(min=1)


def advantages(
    reward: torch.Tensor,
    own: torch.Tensor,
    baseline: str,
    running: float | None,
    momentum: float,
    normalize: bool,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """``(advantage, baseline, running)`` for rewards ``[K, B]`` of the policy's ``own`` rows
    ``[B]``: ``rloo`` compares each sample with the other samples of its context; ``moving_average``
    with ``running`` (the running mean of the reward, updated with ``momentum`` and returned);
    ``normalize`` makes the advantages mean 0, std 1 over the (global) batch."""
    reduce = reduce or _identity
    weight = own.view(1, -1)
    if baseline == "rloo":
        base = rloo_baseline(reward)
    else:
        mean_r = float(weighted_mean(reward, weight, reduce))
        previous = running if running is not None else mean_r
        base = torch.full_like(reward, previous)
        running = momentum * previous + (1 - momentum) * mean_r
    adv = reward - base
    if normalize:
        adv = normalise(adv, weight, reduce)
    return adv, base, running
