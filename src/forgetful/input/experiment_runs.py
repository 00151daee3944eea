"""The forget experiment's scored runs: the oracle's (the headroom, on the first held-out rows), the
zero-shot one (every strategy on the base LM, learned policies and their equal-FLOPs peers
included) and the finetuned ones (an LM finetuned on one strategy's keep sets, that strategy)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .evaluation import batches_of, choose_keep, evaluate_forgetting, flops_ratios
from .experiment_results import example_key, is_baseline, read_results
from .policies import build_mask, parse_strategy
from .policy_training import load_policy
from .reinforce import ForgetMaskTrainer
from .strategy import split_strategies


def learned_label(strategy: str, learner: str, seed: int) -> str:
    return f"{strategy} [{learner} s{seed}]"


def best_zero_shot(out, keep: float, config) -> str:
    """The best baseline of the zero-shot run at ``keep`` (lowest NLL; the oracle starts there), or
    the task's prior when that run has not been made."""
    _, rows = read_results(out)
    peers = [r for r in rows if r["run"] == f"zero_shot_{keep:g}" and is_baseline(r)]
    if not peers:
        print(f"oracle: no zero-shot run at keep {keep:g} yet; it starts from the prior {config.prior}", flush=True)
        return config.prior
    return min(peers, key=lambda r: r["nll"])["strategy"]


def scored_run(config, training, base, tok, data, name, protocol, strategy, keep, out, autocast):
    """One run's rows and their per-example NLLs (``config``: the experiment's
    :class:`~.experiment.ForgetExperimentConfig`; ``data``: its :class:`~.experiment.ExperimentData`)."""
    device = next(base.parameters()).device
    keeps = config.keep_ratios if keep is None else [keep]
    held = data.held
    lm_sequences = epochs = steps = 0
    learned = {}  # label -> (mask, learner, seed)
    if protocol == "oracle":
        model, strategies, policies = base, (), {}
        start = {} if "start" in parse_strategy(strategy).kwargs else {"start": best_zero_shot(out, keep, config)}
        oracle = build_mask(strategy, base, seed=training.seed, device=device, **start)
        policies = {oracle.strategy: oracle}
        if config.oracle_examples is not None:
            held = held.select(range(min(config.oracle_examples, len(held))))
    elif protocol == "zero_shot":
        model = base
        for _, p, learner, seed in config.learned_runs(keep):
            mask = load_policy(out, p, learner, seed, keep, base)
            learned[learned_label(mask.strategy, learner, seed)] = (mask, learner, seed)
        for index, folder in enumerate(split_strategies(config.saved_policies)):  # index: their "seed", a key
            mask = build_mask(folder, base).to(device).eval()
            learned[f"{mask.strategy} [saved {Path(folder).parent.name}/{Path(folder).name}]"] = (mask, "saved", index)
        policies = {label: mask for label, (mask, *_) in learned.items()}
        strategies = tuple(config.strategies("zero_shot"))
    else:
        from ..models import load_model

        model, _ = load_model(config.model)
        if "|" in strategy:
            p, learner, seed = strategy.split("|")
            mask = load_policy(out, p, learner, int(seed), keep, base)
            learned[learned_label(mask.strategy, learner, int(seed))] = (mask, learner, int(seed))
        else:
            mask = build_mask(strategy, base, seed=training.seed, device=device)
        run_args = replace(
            training,
            output_dir=None,  # no checkpoints: a run takes minutes, and one cut short is run again
            run_name=name,
            freeze_lm=False,
            freeze_policy=mask.learned,
            keep_best=False,
        )
        trainer = ForgetMaskTrainer(
            model,
            mask,
            run_args,
            keep_ratio=keep or 1.0,
            exploration_epochs=[0.0] * config.finetune_epochs,
            train_dataset=data.train,
            tokenizer=tok,
        )
        epochs, steps = len(trainer.phases), trainer.total_steps
        lm_sequences = trainer.total_steps * trainer.rows_per_step
        model, mask, _ = trainer.train()
        label = next(iter(learned)) if learned else mask.strategy
        policies, strategies = {label: mask}, ()
    model.eval()
    evaluate = dict(
        pad_token_id=tok.pad_token_id,
        batch_size=config.eval_batch_size,
        timing_repeats=config.timing_repeats if device.type == "cuda" else 0,
        seed=training.seed,
        autocast=autocast,
        tokenizer=tok,
        max_new_tokens=config.max_new_tokens if config.task == "tofu_qa" else 0,
        per_example=True,
        progress=not training.disable_tqdm,
        scorer_is_lm=model is base,
    )
    found = evaluate_forgetting(model, policies, held, keep_ratios=keeps, strategies=strategies, **evaluate)
    from .eval_report import add_speedups

    add_speedups(found)  # against the identity of the same run (zero-shot), else left empty
    for r in found:
        if r["strategy"] in learned:
            mask, learner, seed = learned[r["strategy"]]
            r.update(
                strategy=mask.strategy,
                learner=learner,
                seed=seed,
                label=r["strategy"],
                prior=getattr(mask, "prior", None),
            )
    if protocol == "zero_shot" and learned and config.flops_matched:
        found += _equal_flops(config, model, held, found, keep, evaluate)
    per_example = {}
    for r in found:
        per_example[example_key(r)] = r.pop("per_example")
        r.update(
            protocol="finetuned" if protocol == "finetuned" else "zero_shot",
            unit=parse_strategy(r["strategy"]).unit,
            lm="base" if model is base else name,
            lm_sequences=lm_sequences,
            epochs=epochs,
            steps=steps,
        )
    if model is not base:
        del model
    return found, per_example


def _equal_flops(config, model, held, found, keep, evaluate) -> list[dict]:
    """The ``flops_matched`` strategy at the keep ratio where its FLOPs equal each learned policy's
    (bisection on its keep sets, which for recency cost no LM forward), scored like the others."""
    from ..nll import unwrap_model

    rows = []
    device = next(model.parameters()).device
    batches = [b.to(device) for b in batches_of(held, config.eval_batch_size, evaluate["pad_token_id"])]
    config_lm = unwrap_model(model).config
    for spec in config.strategies("flops_matched"):
        mask = build_mask(spec, model, seed=evaluate["seed"], device=device)
        own = mask.extra_flops_per_token(int(batches[0].context_ids.shape[1]))

        def ratio(k: float, mask=mask, own=own) -> float:
            keeps = [choose_keep(mask, b, keep_ratio=k) for b in batches]
            return flops_ratios(config_lm, batches, keeps, own, forget_layer=mask.forget_layer)[0]

        for r in [r for r in found if r.get("learner")]:
            lo, hi = 1e-3, 1.0 - 1e-6
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if ratio(mid) < r["flops_ratio"] else (lo, mid)
            matched = round((lo + hi) / 2, 4)
            got = evaluate_forgetting(model, {}, held, keep_ratios=[matched], strategies=(spec,), **evaluate)[0]
            got.update(keep_ratio=keep, keep_ratio_used=matched, flops_matched_for=r["label"])
            rows.append(got)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows
