"""The input-forgetting experiment with a fair protocol (``forgetful forget-experiment``).

Every strategy gets the same chance to adapt, at equal kept budgets and on the same targets:

* ``policy_<p>_<keep>``: a learned policy is trained on the **frozen** base LM at that budget: a
  supervised warm start from leave-one-unit-out labels (:mod:`.supervision`), then REINFORCE with a
  leave-one-out baseline; the version that scores best on validation rows held out of training is
  kept (the untrained prior, the warm start, or a REINFORCE step), so training can only improve on
  the prior it starts from;
* ``zero_shot_<keep>``: every strategy, learned policies included, scored on the base LM as it comes;
* ``ft_<strategy>_<keep>``: each strategy scored on an LM finetuned to read that strategy's own
  keep sets, **every LM on the same training rows for the same epochs** (``lm_sequences`` on every
  row); a learned policy is frozen while its LM is finetuned; ``ft_identity`` finetunes at full
  context. Scorers (attention, self-information, a policy's early layers) read the frozen base LM.

Baselines: identity, no context, random, recency, lexical overlap (BM25-style, with the question),
pooled attention (SnapKV) and self-information, at token level and on the task's units
(``name@unit``). Each learned row carries ``ci95``: a paired bootstrap over held-out authors (TOFU-QA)
or windows (text) of its NLL minus the best baseline's. ``results.json`` holds ``env`` (GPU,
versions, git commit) and the rows; each run is written as soon as it finishes, under a file lock,
so several processes (one per keep ratio, say) can share one folder; finished runs are skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState

from ..errors import ForgetfulError, check_choices
from ..measure import run_environment
from ..models import bf16_autocast, load_model
from .evaluation import add_speedups, evaluate_forgetting
from .examples import load_forget_examples
from .experiment_results import read_results, record_run
from .options import TextWindowOptions, parse_keep
from .policies import build_mask, mask_names, parse_strategy
from .policy_training import load_policy, train_policy
from .reinforce import ForgetMaskTrainer, ForgetTrainingConfig

# the task's default unit (for learned policies and ``@unit`` in strategy lists) and residual prior
TASK_UNIT = {"tofu_qa": "task", "text": "sentence"}
TASK_PRIOR = {"tofu_qa": "lexical", "text": "recency"}
PRIOR_NAMES = "random,recency,lexical,attention_score,self_information"


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass(kw_only=True)
class ForgetExperimentConfig(TextWindowOptions):
    """What the experiment compares; the training options are :class:`ForgetTrainingConfig`'s
    (``--out`` is the experiment's folder; the LM finetuning of every strategy uses its LM options,
    the policy training its policy options)."""

    model: str = field(metadata={"help": "The base LM: smollm2-135m, a folder or a Hub name."})
    task: Literal["tofu_qa", "text"] = field(default="tofu_qa", metadata={"help": "tofu_qa or text windows."})
    data: str | None = field(default=None, metadata={"help": "tofu_qa: the TOFU folder (default: embedded data)."})
    train_file: str | None = field(default=None, metadata={"help": "text: the training text file."})
    eval_file: str | None = field(default=None, metadata={"help": "text: the held-out text file."})
    keep: str = field(default="0.5", metadata={"help": "Keep ratios, comma separated."})
    unit: str | None = field(
        default=None,
        metadata={
            "help": "What learned policies keep whole, and what '@unit' in the strategy lists means: token, sentence, "
            "chunk:N or task (default: task for tofu_qa, sentence for text)."
        },
    )
    zero_shot: str = field(
        default=f"identity,none,{PRIOR_NAMES},random@unit,recency@unit,lexical@unit,attention_score@unit,"
        "self_information@unit",
        metadata={
            "help": "Baselines scored on the base LM (learned policies are always added); name@unit keeps units."
        },
    )
    finetuned: str = field(
        # the strongest baselines first: a run cut short by its time limit loses the least telling rows
        default="identity,lexical@unit,attention_score@unit,recency@unit,random@unit,self_information@unit,"
        f"{PRIOR_NAMES}",
        metadata={"help": "Baselines that each get an LM finetuned on their own keep sets (learned policies too)."},
    )
    policies: str = field(default="residual", metadata={"help": "Learned policies (trained on the frozen base LM)."})
    prior: str | None = field(
        default=None,
        metadata={"help": "The residual policy's prior: recency, lexical, attention_score or self_information."},
    )
    policy_layer: int = field(default=4, metadata={"help": "Early layer whose hidden states the policy reads."})
    policy_hidden_size: int = field(default=128, metadata={"help": "Width of the learned policy."})
    policy_steps: int = field(default=500, metadata={"help": "REINFORCE steps of each learned policy."})
    policy_eval_steps: int = field(default=100, metadata={"help": "Score the policy on validation rows every N steps."})
    warm_rows: int = field(default=512, metadata={"help": "Training rows labelled for the warm start (0: none)."})
    warm_steps: int = field(default=200, metadata={"help": "Steps of the supervised warm start."})
    val_examples: int = field(
        default=96, metadata={"help": "Training rows held out of policy training to pick the best policy."}
    )
    finetune_epochs: int = field(default=1, metadata={"help": "Epochs of LM finetuning, the same for every strategy."})
    train_examples: int | None = field(default=None, metadata={"help": "At most this many training examples."})
    eval_examples: int | None = field(default=None, metadata={"help": "At most this many held-out examples."})
    questions_per_author: int = field(default=10, metadata={"help": "tofu_qa: held-out questions per author."})
    num_authors: int = field(default=200, metadata={"help": "tofu_qa on the embedded data: authors generated."})
    eval_batch_size: int = field(
        default=16, metadata={"help": "Rows per evaluation batch (also for generating answers)."}
    )
    max_new_tokens: int = field(default=48, metadata={"help": "tofu_qa: longest generated answer (0: no ROUGE)."})
    timing_repeats: int = field(default=5, metadata={"help": "Timed forwards per strategy (0: no timing)."})
    bootstrap: int = field(default=2000, metadata={"help": "Resamples of the paired bootstrap."})
    only: str | None = field(
        default=None,
        metadata={"help": "Run only these runs now (policy_residual_0.5, zero_shot_0.5, ft_recency_0.5, ...)."},
    )

    def __post_init__(self):
        check_choices(self)
        from .units import check_unit

        self.keep_ratios = parse_keep(self.keep, allow_one=False)
        self.unit = check_unit(self.unit or TASK_UNIT[self.task])
        self.prior = self.prior or TASK_PRIOR[self.task]
        for name in ("finetune_epochs", "policy_steps", "policy_eval_steps", "bootstrap"):
            if getattr(self, name) < 1:
                raise ForgetfulError(f"{name} must be at least 1, got {getattr(self, name)}")
        for option in ("zero_shot", "finetuned", "policies"):
            for spec in self.strategies(option):
                name, _ = parse_strategy(spec)
                if name not in mask_names():
                    raise ForgetfulError(f"{option}: unknown strategy {spec}; known: {', '.join(sorted(mask_names()))}")
        learned = set(mask_names(learned=True))
        if {
            parse_strategy(s)[0] for s in self.strategies("zero_shot") + self.strategies("finetuned")
        } & learned or not {parse_strategy(s)[0] for s in self.strategies("policies")} <= learned:
            raise ForgetfulError(
                "zero_shot and finetuned take strategies that are not learned; policies takes learned ones"
            )
        if self.task == "text" and (self.train_file is None or self.eval_file is None):
            raise ForgetfulError("the text task needs --train-file and --eval-file")

    def strategies(self, option: str) -> list[str]:
        """The strategy names of ``option`` (``zero_shot``, ``finetuned``, ``policies``) with ``@unit``
        spelled out; a token-level unit spelled out is the plain name (no duplicates)."""
        out = []
        for spec in _names(getattr(self, option)):
            name, _, unit = spec.partition("@")
            unit = self.unit if unit == "unit" else unit
            spec = name if not unit or unit == "token" else f"{name}@{unit}"
            if spec not in out:
                out.append(spec)
        return out

    def runs(self) -> list[tuple[str, str, str, float | None]]:
        """(run name, protocol, strategy, keep ratio or None for every ratio), in the order that
        answers the question first: policies, then zero-shot, then the finetuned LMs (the learned
        policies' before the baselines'), per keep ratio."""
        out = []
        for k in self.keep_ratios:
            out += [(f"policy_{p}_{k:g}", "policy", p, k) for p in self.strategies("policies")]
            out.append((f"zero_shot_{k:g}", "zero_shot", "", k))
        baselines = self.strategies("finetuned")
        if "identity" in baselines:
            out.append(("ft_identity", "finetuned", "identity", None))
        for k in self.keep_ratios:
            out += [(f"ft_{p}_{k:g}", "finetuned", p, k) for p in self.strategies("policies")]
            out += [(f"ft_{s}_{k:g}", "finetuned", s, k) for s in baselines if s != "identity"]
        return out


# -- the runs -----------------------------------------------------------------------------------


def run_forget_experiment(config: ForgetExperimentConfig, training: ForgetTrainingConfig) -> list[dict]:
    if training.output_dir is None:
        raise ForgetfulError("--out is required: the experiment's folder")
    out = Path(training.output_dir)
    _, rows = read_results(out)
    done = {r["run"] for r in rows}
    only = None if config.only is None else set(_names(config.only))
    names = {name for name, *_ in config.runs()}
    if only is not None and not only <= names:
        raise ForgetfulError(f"--only names unknown runs {sorted(only - names)}; runs are {', '.join(sorted(names))}")
    cpu = training.use_cpu or not torch.cuda.is_available()
    device = PartialState(cpu=cpu).device
    env = run_environment(device)
    base, tok = load_model(config.model)
    base.to(device).eval()
    for p in base.parameters():  # the base LM is never trained here: scorers and policies read it
        p.requires_grad_(False)
    train, policy_train, val, held = _data(config, tok, training.seed)
    autocast = bf16_autocast(device)
    for name, protocol, strategy, keep in config.runs():
        if name in done or (only is not None and name not in only):
            continue
        start = time.perf_counter()
        print(f"[{name}]", flush=True)
        if protocol == "policy":
            found = [train_policy(config, training, base, tok, policy_train, val, strategy, keep, out, autocast)]
            per_example = {}
        else:
            found, per_example = _scored_run(
                config, training, base, tok, train, held, name, protocol, strategy, keep, out, autocast
            )
        for r in found:
            r.update(task=config.task, run=name, seconds=round(time.perf_counter() - start, 1))
        rows = record_run(out, name, found, per_example, env, config, training)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _scored_run(config, training, base, tok, train, held, name, protocol, strategy, keep, out, autocast):
    """A zero-shot run (the base LM, every strategy) or a finetuned one (an LM finetuned on one
    strategy's keep sets, that strategy): its rows and their per-example NLLs."""
    device = next(base.parameters()).device
    learned = set(mask_names(learned=True))
    keeps = config.keep_ratios if keep is None else [keep]
    lm_sequences = epochs = steps = 0
    if protocol == "zero_shot":
        model = base
        loaded = [load_policy(out, p, keep, base) for p in config.strategies("policies")]
        policies = {p.strategy: p for p in loaded}
        strategies = tuple(config.strategies("zero_shot"))
    else:
        model, _ = load_model(config.model)
        if parse_strategy(strategy)[0] in learned:
            mask = load_policy(out, strategy, keep, base)
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
            forget_p=1 - keep if keep else 0.0,
            exploration_epochs=[0.0] * config.finetune_epochs,
            train_dataset=train,
            tokenizer=tok,
        )
        epochs, steps = len(trainer.phases), trainer.total_steps
        lm_sequences = trainer.total_steps * trainer.rows_per_step
        model, mask, _ = trainer.train()
        policies, strategies = {mask.strategy: mask}, ()
    model.eval()
    found = evaluate_forgetting(
        model,
        policies,
        held,
        keep_ratios=keeps,
        pad_token_id=tok.pad_token_id,
        strategies=strategies,
        batch_size=config.eval_batch_size,
        timing_repeats=config.timing_repeats if device.type == "cuda" else 0,
        seed=training.seed,
        autocast=autocast,
        tokenizer=tok,
        max_new_tokens=config.max_new_tokens if config.task == "tofu_qa" else 0,
        per_example=True,
        progress=not training.disable_tqdm,
    )
    add_speedups(found)  # against the identity of the same run (zero-shot), else left empty
    per_example = {}
    for r in found:
        per_example[f"{r['strategy']}@{r['keep_ratio']:g}"] = r.pop("per_example")
        r.update(
            protocol=protocol,
            unit=parse_strategy(r["strategy"])[1],
            lm="base" if protocol == "zero_shot" else name,
            lm_sequences=lm_sequences,
            epochs=epochs,
            steps=steps,
        )
    if model is not base:
        del model
    return found, per_example


def _data(config: ForgetExperimentConfig, tok, seed: int):
    """(training rows for the LMs, the rows policies train on, validation rows held out of those to
    pick policies, held-out evaluation rows)."""
    if config.task == "tofu_qa":
        from .examples import tofu_qa_examples

        kw = dict(seed=seed, num_authors=config.num_authors)
        train = tofu_qa_examples(tok, config.data, part="train", **kw)
        held = tofu_qa_examples(tok, config.data, part="eval", questions_per_author=config.questions_per_author, **kw)
    else:
        kw = dict(context_length=config.context_length, target_length=config.target_length, seed=seed)
        train = load_forget_examples(config.train_file, tok, stride=config.stride, **kw)
        held = load_forget_examples(config.eval_file, tok, **kw)  # held-out windows never overlap
    if config.train_examples is not None:
        train = train.shuffle(seed=seed).select(range(min(config.train_examples, len(train))))
    if config.eval_examples is not None:
        held = held.select(range(min(config.eval_examples, len(held))))
    return (train, *_validation(train, config.val_examples, seed), held)


def _validation(train, size: int, seed: int):
    """``(rest, validation)``: about ``size`` training rows to pick policies on, whole groups
    (authors) where rows have them, and the rows that policies train on."""
    from collections import Counter

    if size < 1:
        raise ForgetfulError(f"val_examples must be at least 1, got {size}")
    if size >= len(train):
        raise ForgetfulError(f"val_examples ({size}) must leave training rows ({len(train)} in all)")
    order = train.shuffle(seed=seed + 1)
    if "group" not in order.column_names:
        return order.select(range(size, len(order))), order.select(range(size))
    groups = order["group"]
    sizes, chosen, count = Counter(groups), set(), 0
    for g in dict.fromkeys(groups):
        if count >= size:
            break
        chosen.add(g)
        count += sizes[g]
    picked = [i for i, g in enumerate(groups) if g in chosen]
    rest = [i for i, g in enumerate(groups) if g not in chosen]
    return order.select(rest), order.select(picked[:size])
