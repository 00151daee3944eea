"""A gradient through the LM: the policy learns from every context token's effect on the target NLL.

REINFORCE (:mod:`.reinforce`) gives the policy one scalar per sampled keep set. Here the keep is
relaxed instead: each unit ``u`` (a token, or a sentence, a chunk, a task unit) is kept with a
probability ``p_u = sigmoid((s_u + L_u - tau) / T)`` where ``s_u`` is the policy's unit score,
``L_u`` logistic noise (the Gumbel-sigmoid, or binary concrete, relaxation) and ``tau`` the
threshold that makes the expected budget exact in every row: ``sum_u size_u * p_u = b`` (the same
``b`` tokens as the hard top-k; found by bisection, its gradient by the implicit function theorem,
:func:`soft_topk`). ``log p`` is added to the attention logits of the unit's tokens as keys, in every
layer after ``forget_layer`` (:func:`~forgetful.input.compression.biased_examples`): a key kept with
``p`` weighs ``p`` times as much, ``p = 0`` drops it, and at 0/1 this is the compressed forward
exactly. The temperature ``T`` anneals geometrically from ``temperature_start`` to
``temperature_end``, towards the hard top-k used at test.

The LM reads the whole row (``n + m`` tokens) forward and backward each step, where REINFORCE reads
``K`` compressed rows (``K (b + m)``) forward: ``match_lm_tokens`` sets the steps so both make the
LM read as many tokens (``RelaxedTrainer.steps_for``). The LM is frozen unless ``train_lm``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ...errors import ForgetfulError
from ..compression import biased_examples, budget_counts, compressed_nll, eligible_tokens, free_budget
from ..units import unit_scores, unit_sizes
from .base import BestOnValidation, LearnerResult, LearnerRun, training_batches


@dataclass
class RelaxedConfig:
    """Options of the relaxed learner (``forget-experiment --learners relaxed``)."""

    temperature_start: float = field(default=1.0, metadata={"help": "Relaxed learner: temperature of the first step."})
    temperature_end: float = field(
        default=0.05, metadata={"help": "Relaxed learner: temperature of the last step (annealed geometrically)."}
    )
    gumbel_scale: float = field(
        default=1.0, metadata={"help": "Relaxed learner: scale of the logistic noise on unit scores (0: none)."}
    )
    match_lm_tokens: bool = field(
        default=True,
        metadata={
            "help": "Relaxed learner: take as many steps as make the LM read (forward + backward) the tokens "
            "REINFORCE reads in its steps (K compressed rows forward per row)."
        },
    )
    train_lm: bool = field(default=False, metadata={"help": "Relaxed learner: train the LM too (joint)."})

    def __post_init__(self):
        if not 0 < self.temperature_end <= self.temperature_start:
            raise ForgetfulError(
                f"temperatures must satisfy 0 < temperature_end <= temperature_start, got {self.temperature_start} "
                f"and {self.temperature_end}"
            )
        if self.gumbel_scale < 0:
            raise ForgetfulError(f"gumbel_scale must be >= 0, got {self.gumbel_scale}")


def soft_topk(
    scores: torch.Tensor, weights: torch.Tensor, budget: torch.Tensor, temperature: float, iters: int = 50
) -> torch.Tensor:
    """``p [B, U] = sigmoid((scores - tau) / temperature)`` with ``tau`` per row such that
    ``sum(weights * p) = budget`` (clamped to ``[0, sum(weights)]``); slots of weight 0 (or score
    ``-inf``) get 0. ``tau`` is found by bisection; its gradient, ``dtau/ds_u = w_u p_u (1 - p_u) /
    sum_v w_v p_v (1 - p_v)``, keeps the expected budget exact to first order."""
    present = (weights > 0) & torch.isfinite(scores)
    w = torch.where(present, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    s = torch.where(present, scores.float(), torch.zeros_like(w))
    k = torch.minimum(budget.float().clamp(min=0), w.sum(-1))
    big = torch.finfo(torch.float32).max
    lo = torch.where(present, s.detach(), torch.full_like(s, big)).min(-1).values - 30 * temperature
    hi = torch.where(present, s.detach(), torch.full_like(s, -big)).max(-1).values + 30 * temperature
    lo, hi = torch.where(torch.isfinite(lo), lo, 0.0), torch.where(torch.isfinite(hi), hi, 0.0)
    with torch.no_grad():
        for _ in range(iters):
            mid = (lo + hi) / 2
            mass = (w * torch.sigmoid((s - mid.unsqueeze(-1)) / temperature)).sum(-1)
            above = mass > k
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        tau = (lo + hi) / 2
        p0 = torch.sigmoid((s - tau.unsqueeze(-1)) / temperature)
        slope = w * p0 * (1 - p0)
        share = slope / slope.sum(-1, keepdim=True).clamp(min=1e-12)
    tau = tau + (share * (s - s.detach())).sum(-1)  # value tau, gradient dtau/ds
    p = torch.sigmoid((s - tau.unsqueeze(-1)) / temperature)
    return torch.where(present, p, torch.zeros_like(p))


def relaxed_keep(
    logits: torch.Tensor,
    units: torch.Tensor | None,
    eligible: torch.Tensor,
    forced: torch.Tensor,
    k_free: torch.Tensor,
    temperature: float,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """``(log_keep [B, n], stats)``: the log-probability that each context token is kept (0 for
    forced tokens, :data:`~forgetful.input.depth.FORGOTTEN` for tokens that cannot be chosen) under
    the relaxed top-k of ``k_free`` eligible tokens over the policy's units (``units`` None: every
    token its own unit). ``noise``: logistic noise ``[B, n]`` per unit slot (None: none). ``stats``:
    the expected kept share of the budget (1 when exact) and the mean binary entropy of the units."""
    n = logits.shape[-1]
    if units is None:
        units = torch.arange(n, device=logits.device).expand_as(logits).masked_fill(~eligible, -1)
    scores = unit_scores(logits.float(), units, eligible)
    weights = unit_sizes(units, eligible)
    if noise is not None:
        scores = scores + noise
    p = soft_topk(scores, weights, k_free, temperature)
    log_p = torch.log(p.clamp(min=1e-30)).clamp(min=-1e4)
    slot = units.clamp(min=0)
    inside = eligible & (units >= 0)
    log_keep = torch.where(inside, log_p.gather(-1, slot), torch.full_like(logits, -1e4, dtype=torch.float32))
    log_keep = torch.where(forced, torch.zeros_like(log_keep), log_keep)
    with torch.no_grad():
        w = weights.float()
        expected = (w * p).sum(-1) / k_free.float().clamp(min=1)
        q = p.clamp(1e-6, 1 - 1e-6)
        entropy = -(q * q.log() + (1 - q) * (1 - q).log())
        entropy = (w * entropy).sum(-1) / w.sum(-1).clamp(min=1)
    return log_keep, {"budget": float(expected.mean()), "entropy": float(entropy.mean())}


class RelaxedTrainer:
    """Fits ``run.policy`` by gradient descent on the target NLL of the LM reading the whole row with
    the relaxed keep added to its attention (see the module docstring)."""

    def __init__(self, run: LearnerRun, config: RelaxedConfig | None = None):
        self.run, self.config = run, config or RelaxedConfig()

    @staticmethod
    def steps_for(reinforce_steps: int, num_samples: int, context_length: int, target_length: int, keep_ratio: float):
        """Steps whose LM tokens (forward + backward of ``n + m`` per row) equal those of
        ``reinforce_steps`` REINFORCE steps (``num_samples`` rows of ``b + m`` forward per row)."""
        kept = round(keep_ratio * context_length)
        return max(
            1, round(reinforce_steps * num_samples * (kept + target_length) / (2 * (context_length + target_length)))
        )

    def train(self) -> LearnerResult:
        from tqdm.auto import tqdm

        r, c = self.run, self.config
        policy, lm = r.policy, r.lm
        params = [p for p in policy.parameters() if p.requires_grad]
        if c.train_lm:
            for p in lm.parameters():
                p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=r.learning_rate)
        lm_optimizer = torch.optim.AdamW(lm.parameters(), lr=r.learning_rate) if c.train_lm else None
        tracker = BestOnValidation(r)
        result = LearnerResult(history=[tracker.offer(0)])
        g = torch.Generator().manual_seed(r.seed + 7)
        policy.train()
        start = time.perf_counter()
        bar = tqdm(total=r.steps, desc="relaxed", disable=not r.progress, dynamic_ncols=True)
        for step, b in enumerate(training_batches(r), start=1):
            temperature = c.temperature_start * (c.temperature_end / c.temperature_start) ** (
                (step - 1) / max(r.steps - 1, 1)
            )
            eligible, forced = eligible_tokens(b.context_mask, r.keep_first, b.protect_mask)
            k = budget_counts(b.context_mask, keep_ratio=r.keep_ratio, keep_first=r.keep_first, protect=b.protect_mask)
            units = policy.resolve_units(b.units(policy.unit), b.context_mask) if policy.unit != "token" else None
            noise = None
            if c.gumbel_scale > 0:
                u = torch.rand(b.context_ids.shape, generator=g).to(b.context_ids.device).clamp(1e-6, 1 - 1e-6)
                noise = c.gumbel_scale * (u.log() - (-u).log1p())
            with r.autocast():
                logits = policy.keep_logits(b.context_ids, b.context_mask, protect=b.protect_mask, units=units)
            log_keep, stats = relaxed_keep(
                logits, units, eligible, forced, free_budget(k, eligible, forced), temperature, noise
            )
            inputs = biased_examples(
                b.context_ids,
                b.context_mask,
                log_keep,
                b.target_ids,
                b.target_mask,
                layer=policy.forget_layer,
                pad_token_id=r.pad_token_id,
            )
            with r.autocast():
                out = compressed_nll(lm, inputs)
            loss = out.mean_per_row().mean()
            optimizer.zero_grad(set_to_none=True)
            if lm_optimizer is not None:
                lm_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if r.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, r.max_grad_norm)
            optimizer.step()
            if lm_optimizer is not None:
                lm_optimizer.step()
            tokens = int(inputs["input_ids"].numel())
            result.lm_tokens_forward += tokens
            result.lm_tokens_backward += tokens
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise ForgetfulError(f"relaxed learner: the loss is {loss_value} at step {step} (lower learning_rate?)")
            result.history.append(
                {"step": step, "loss": loss_value, "temperature": temperature, "time_s": time.perf_counter() - start}
                | stats
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", T=f"{temperature:.3f}", entropy=f"{stats['entropy']:.3f}")
            if step % r.eval_steps == 0 or step == r.steps:
                result.history.append(tracker.offer(step))
        bar.close()
        if c.train_lm:
            for p in lm.parameters():
                p.requires_grad_(False)
        tracker.restore()
        policy.eval()
        result.best_nll, result.best_step = tracker.best_nll, tracker.best_step
        return result
