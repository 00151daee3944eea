"""The forget experiment's policy stage: a learned policy trained on the frozen base LM at one keep
ratio - a supervised warm start (:mod:`.supervision`), REINFORCE (:class:`~.reinforce.ForgetMaskTrainer`
with the LM frozen), the version best on held-out validation rows kept (the untrained prior
included) - then saved with its history and training curves."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import ForgetfulError
from ..reporting import plot_panels, write_json
from .evaluation import batches_of, evaluate_strategy
from .policies import LearnedForgetMask, build_mask, parse_strategy
from .reinforce import ForgetMaskTrainer
from .supervision import warm_start


def _policy_dir(out: Path, strategy: str, keep: float) -> Path:
    return out / "policies" / f"{strategy}_{keep:g}"


def load_policy(out: Path, strategy: str, keep: float, base) -> LearnedForgetMask:
    folder = _policy_dir(out, strategy, keep)
    if not folder.is_dir():
        raise ForgetfulError(
            f"no trained {strategy} policy for keep {keep:g} in {folder}: run policy_{strategy}_{keep:g} first"
        )
    return LearnedForgetMask.from_pretrained(folder, base).to(next(base.parameters()).device).eval()


def train_policy(config, training, base, tok, train, val, strategy, keep, out, autocast) -> dict:
    """Train one learned policy on the frozen base LM at ``keep``: warm start, REINFORCE, keep the
    best on the validation rows (``config``: the experiment's
    :class:`~.experiment.ForgetExperimentConfig`). Writes the policy, its history and a plot;
    returns a summary row."""
    device = next(base.parameters()).device
    torch.manual_seed(training.seed)  # the policy's initial weights are a function of the seed alone
    policy = build_mask(strategy, base, learned=True, unit=config.unit, **_policy_options(strategy, config)).to(device)
    val_batches = batches_of(val, training.per_device_batch_size, tok.pad_token_id)

    def val_nll() -> float:
        return evaluate_strategy(
            base, policy, val_batches, keep_ratio=keep, pad_token_id=tok.pad_token_id, device=device, autocast=autocast
        )["nll"]

    history: list[dict] = []
    prior_nll, prior_state = val_nll(), {k: v.detach().clone() for k, v in policy.state_dict().items()}
    warm = None
    if config.warm_rows and policy.unit != "token":
        rows = train.shuffle(seed=training.seed).select(range(min(config.warm_rows, len(train))))
        warm = warm_start(
            policy,
            base,
            batches_of(rows, training.per_device_batch_size, tok.pad_token_id),
            pad_token_id=tok.pad_token_id,
            steps=config.warm_steps,
            learning_rate=training.policy_learning_rate,
            device=device,
            autocast=autocast,
            progress=not training.disable_tqdm,
        )
        history += warm.history
    batch = training.per_device_batch_size * training.gradient_accumulation_steps
    per_epoch = max(1, len(train) // batch)
    epochs = math.ceil(config.policy_steps / per_epoch)
    run_args = replace(
        training,
        output_dir=None,
        run_name=f"policy_{strategy}_{keep:g}",
        freeze_lm=True,
        freeze_policy=False,
        keep_best=True,
        eval_baselines=False,
        eval_steps=config.policy_eval_steps,
        eval_batches=len(val_batches),
        logging_steps=1,
        lr_scheduler_type="constant",  # constant after the warm-up: REINFORCE keeps learning to the end
        max_steps_per_epoch=math.ceil(config.policy_steps / epochs),
    )
    trainer = ForgetMaskTrainer(
        base,
        policy,
        run_args,
        forget_p=1 - keep,
        exploration_epochs=[0.0] * epochs,
        train_dataset=train,
        eval_dataset=val,
        tokenizer=tok,
    )
    t0 = time.perf_counter()
    _, policy, steps = trainer.train()
    history += steps
    seconds_rl = time.perf_counter() - t0
    best, best_step = trainer.state.best_nll, trainer.state.best_step
    chosen = f"reinforce step {best_step}" if best_step else ("warm start" if warm is not None else "prior")
    if best is None or prior_nll <= best:  # training did not beat the untrained prior
        policy.load_state_dict(prior_state)
        chosen, best = "prior", prior_nll
    for p in policy.parameters():
        p.requires_grad_(False)
    folder = _policy_dir(out, strategy, keep)
    policy.save_pretrained(folder)
    write_json(history, folder / "history.json")
    _plot_policy_training(history, folder / "training.png", f"{strategy} at keep {keep:g}")
    evals = [h for h in history if h.get("eval")]
    return {
        "protocol": "policy_training",
        "strategy": policy.strategy,
        "keep_ratio": keep,
        "unit": policy.unit,
        "prior": getattr(policy, "prior", None),
        "val_nll_prior": prior_nll,
        "val_nll_warm_start": evals[0]["eval_policy_nll"] if evals and warm is not None else None,
        "val_nll_best": best,
        "chosen": chosen,
        "warm_rows": warm.rows if warm else 0,
        "warm_steps": config.warm_steps if warm else 0,
        "policy_steps": trainer.total_steps,
        "policy_sequences": trainer.total_steps * trainer.rows_per_step * training.num_samples,
        "num_samples": training.num_samples,
        "epochs": epochs,
        "steps": trainer.total_steps,
        "lm_sequences": 0,
        "seconds_labels": round(warm.seconds_labels, 1) if warm else 0.0,
        "seconds_warm_start": round(warm.seconds_fit, 1) if warm else 0.0,
        "seconds_reinforce": round(seconds_rl, 1),
    }


def _policy_options(strategy: str, config) -> dict:
    options = {"hidden_size": config.policy_hidden_size}
    name = parse_strategy(strategy)[0]
    if name in ("residual", "hidden_state"):
        options["layer"] = config.policy_layer
    if name == "residual":
        options["prior"] = config.prior
    return options


def _running_mean(values: list[float], window: int = 25) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _plot_policy_training(history: list[dict], path: Path, title: str) -> None:
    """The warm start's loss, then per REINFORCE step the reward, the entropy of the policy and the
    share of samples that kept the answer (running means of 25 steps over the raw values), and the
    validation NLL at each evaluation."""
    steps = [h for h in history if "reward" in h]
    evals = [h for h in history if h.get("eval")]
    warm = [h for h in history if "listwise_loss" in h]
    panels = {}

    def curve(rows, x, key):
        xs, ys = [h[x] for h in rows], [h[key] for h in rows]
        return {"raw": (xs, ys), "running mean": (xs, _running_mean(ys))}

    if warm:
        panels["warm start: listwise loss"] = curve(warm, "warm_step", "listwise_loss")
    for key, label in (
        ("reward", "reward (-target NLL)"),
        ("entropy", "entropy over units"),
        ("answer_kept", "answer kept (share of samples)"),
    ):
        if steps and key in steps[0]:
            panels[label] = curve(steps, "step", key)
    if evals:
        panels["validation NLL"] = {"policy": ([h["step"] for h in evals], [h["eval_policy_nll"] for h in evals])}
    if panels:
        plot_panels(panels, path, xlabel="step", title=title)
