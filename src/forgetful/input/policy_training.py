"""The forget experiment's policy stage: one learned policy fitted on the frozen base LM at one keep
ratio by one learner (:mod:`.learners`) and one seed; the version best on the validation rows is
kept (the untrained prior included), then saved with its history and training curves.

The validation NLL that chose the version is a **selection statistic** (``val_nll_selected``): it
was picked on those rows, so it overstates the gain; results are the held-out rows' (the zero-shot
and finetuned runs)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import ForgetfulError
from ..reporting import plot_panels, write_json
from .learners import BestOnValidation, LearnerRun, fit_policy
from .policies import LearnedForgetMask, build_mask, parse_strategy


def policy_dir(out: Path, strategy: str, learner: str, seed: int, keep: float) -> Path:
    return out / "policies" / f"{parse_strategy(strategy).name}_{learner}_{keep:g}_s{seed}"


def load_policy(out: Path, strategy: str, learner: str, seed: int, keep: float, base) -> LearnedForgetMask:
    folder = policy_dir(out, strategy, learner, seed, keep)
    if not folder.is_dir():
        raise ForgetfulError(
            f"no trained {strategy} policy ({learner}, seed {seed}) for keep {keep:g} in {folder}: run its policy run first"
        )
    return LearnedForgetMask.from_pretrained(folder, base).to(next(base.parameters()).device).eval()


def policy_options(strategy: str, config) -> dict:
    options = {"hidden_size": config.policy_hidden_size}
    name = parse_strategy(strategy).name
    if name in ("residual", "hidden_state"):
        options["layer"] = config.policy_layer
    if name == "residual":
        options["prior"] = config.prior
    return options


def train_policy(
    config, training, base, tok, data, strategy, learner, seed, keep, out, autocast, *, relaxed, supervised, run_name
) -> dict:
    """Fit one learned policy on the frozen base LM at ``keep`` with ``learner`` and ``seed``
    (``config``: the experiment's :class:`~.experiment.ForgetExperimentConfig`; ``data``: its
    :class:`~.experiment.ExperimentData`); keep the best on the validation rows. Writes the policy,
    its history and a plot; returns a summary row."""
    from .learners import RelaxedTrainer

    device = next(base.parameters()).device
    torch.manual_seed(seed)  # the policy's initial weights are a function of the seed alone
    policy = build_mask(strategy, base, learned=True, unit=config.unit, **policy_options(strategy, config)).to(device)
    policy.forget_layer = config.policy_forget_layer
    steps = config.policy_steps
    if learner == "relaxed" and relaxed.match_lm_tokens:
        n = sum(len(r) for r in data.policy_train["context_ids"]) / len(data.policy_train)
        m = sum(len(r) for r in data.policy_train["target_ids"]) / len(data.policy_train)
        steps = RelaxedTrainer.steps_for(config.policy_steps, training.num_samples, round(n), round(m), keep)
    run = LearnerRun(
        policy=policy,
        lm=base,
        train=data.policy_train,
        val=data.val,
        keep_ratio=keep,
        pad_token_id=tok.pad_token_id,
        steps=steps,
        batch_size=training.per_device_train_batch_size,
        learning_rate=training.policy_learning_rate,
        eval_steps=config.policy_eval_steps,
        seed=seed,
        keep_first=training.keep_first,
        device=device,
        autocast=autocast,
        progress=not training.disable_tqdm,
        max_grad_norm=training.max_grad_norm,
    )
    prior = BestOnValidation(run)
    prior_nll = prior.offer(0)["eval_policy_nll"]
    t0 = time.perf_counter()
    result = fit_policy(
        learner,
        run,
        training=training,
        relaxed=relaxed,
        supervised=supervised,
        warm_rows=config.warm_rows,
        warm_steps=config.warm_steps,
    )
    seconds = time.perf_counter() - t0
    chosen = f"{learner} step {result.best_step}" if result.best_step else "start"
    best = result.best_nll
    if best is None or prior_nll <= best:  # learning did not beat the untrained prior on these rows
        prior.restore()
        chosen, best = "prior", prior_nll
    for p in policy.parameters():
        p.requires_grad_(False)
    folder = policy_dir(out, strategy, learner, seed, keep)
    policy.save_pretrained(folder)
    write_json(result.history, folder / "history.json")
    plot_policy_training(result.history, folder / "training.png", f"{strategy}, {learner}, seed {seed}, keep {keep:g}")
    return {
        "protocol": "policy_training",
        "strategy": policy.strategy,
        "learner": learner,
        "seed": seed,
        "keep_ratio": keep,
        "unit": policy.unit,
        "forget_layer": policy.forget_layer,
        "prior": getattr(policy, "prior", None),
        "val_nll_prior": prior_nll,
        "val_nll_selected": best,  # a selection statistic: chosen on these rows
        "chosen": chosen,
        "policy_steps": steps,
        "batch_size": training.per_device_train_batch_size,
        "val_rows": len(data.val),
        "lm_tokens_forward": result.lm_tokens_forward,
        "lm_tokens_backward": result.lm_tokens_backward,
        "lm_sequences": 0,
        "epochs": None,
        "steps": steps,
        "seconds_learning": round(seconds, 1),
        **result.extra,
    }


def _running_mean(values: list[float], window: int = 25) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_policy_training(history: list[dict], path: Path, title: str) -> None:
    """Each learner's curves: a warm start's or the supervised fit's listwise loss, REINFORCE's
    reward, the relaxed learner's loss and temperature, the entropy of the policy, the share of
    samples that kept the answer, the expected budget (running means of 25 steps over the raw
    values), and the validation NLL at each evaluation."""
    evals = [h for h in history if h.get("eval")]
    panels = {}

    def curve(rows, x, key):
        xs, ys = [h[x] for h in rows], [h[key] for h in rows]
        return {"raw": (xs, ys), "running mean": (xs, _running_mean(ys))}

    for key, label, x in (
        ("listwise_loss", "listwise loss (warm start / supervised fit)", None),
        ("reward", "reward (-target NLL)", "step"),
        ("loss", "relaxed: target NLL with the soft keep", "step"),
        ("temperature", "relaxed: temperature", "step"),
        ("entropy", "entropy of the policy", "step"),
        ("budget", "relaxed: expected kept / budget", "step"),
        ("answer_kept", "answer kept (share of samples)", "step"),
    ):
        rows = [h for h in history if key in h and not h.get("eval")]
        if rows:
            xkey = x or ("warm_step" if "warm_step" in rows[0] else "step")
            panels[label] = curve(rows, xkey, key)
    if evals:
        panels["validation NLL (selection rows)"] = {
            "policy": ([h["step"] for h in evals], [h["eval_policy_nll"] for h in evals])
        }
    if panels:
        plot_panels(panels, path, xlabel="step", title=title)
