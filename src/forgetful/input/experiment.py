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

import contextlib
import fcntl
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState

from ..errors import ForgetfulError, check_choices
from ..measure import run_environment
from ..models import bf16_autocast, load_model
from ..reporting import markdown_table, plot_panels, plot_ranked_bars, write_json, write_text
from .evaluation import add_speedups, batches_of, evaluate_forgetting, evaluate_strategy, paired_bootstrap
from .examples import load_forget_examples
from .policies import LearnedForgetMask, build_mask, mask_names, parse_strategy
from .reinforce import ForgetMaskTrainer, ForgetTrainingConfig
from .supervision import warm_start

# the task's default unit (for learned policies and ``@unit`` in strategy lists) and residual prior
TASK_UNIT = {"tofu_qa": "task", "text": "sentence"}
TASK_PRIOR = {"tofu_qa": "lexical", "text": "recency"}
PRIOR_NAMES = "random,recency,lexical,attention_score,self_information"


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass
class ForgetExperimentConfig:
    """What the experiment compares; the training options are :class:`ForgetTrainingConfig`'s
    (``--out`` is the experiment's folder; the LM finetuning of every strategy uses its LM options,
    the policy training its policy options)."""

    model: str = field(metadata={"help": "The base LM: smollm2-135m, a folder or a Hub name."})
    task: Literal["tofu_qa", "text"] = field(default="tofu_qa", metadata={"help": "tofu_qa or text windows."})
    data: str | None = field(default=None, metadata={"help": "tofu_qa: the TOFU folder (default: embedded data)."})
    train_file: str | None = field(default=None, metadata={"help": "text: the training text file."})
    eval_file: str | None = field(default=None, metadata={"help": "text: the held-out text file."})
    context_length: int = field(default=1024, metadata={"help": "text: context tokens per window."})
    target_length: int = field(default=32, metadata={"help": "text: target tokens per window."})
    stride: int | None = field(default=None, metadata={"help": "text: tokens between window starts (default n + m)."})
    keeps: str = field(default="0.5", metadata={"help": "Keep ratios, comma separated."})
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
        default=f"identity,{PRIOR_NAMES},random@unit,recency@unit,lexical@unit,attention_score@unit,"
        "self_information@unit",
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

        try:
            ratios = [float(k) for k in _names(self.keeps)]
        except ValueError:
            raise ForgetfulError(f"keeps must be numbers like 0.5,0.25, got {self.keeps!r}") from None
        if not ratios or any(not 0 < r < 1 for r in ratios):
            raise ForgetfulError(f"keep ratios must lie in (0, 1), got {self.keeps!r}")
        self.keep_ratios = ratios
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
        answers the question first: policies, then zero-shot, then the finetuned LMs, per keep ratio."""
        out = []
        for k in self.keep_ratios:
            out += [(f"policy_{p}_{k:g}", "policy", p, k) for p in self.strategies("policies")]
            out.append((f"zero_shot_{k:g}", "zero_shot", "", k))
        baselines = self.strategies("finetuned")
        if "identity" in baselines:
            out.append(("ft_identity", "finetuned", "identity", None))
        for k in self.keep_ratios:
            out += [(f"ft_{s}_{k:g}", "finetuned", s, k) for s in baselines if s != "identity"]
            out += [(f"ft_{p}_{k:g}", "finetuned", p, k) for p in self.strategies("policies")]
        return out


# -- the results folder: shared by processes, one lock ---------------------------------------


@contextlib.contextmanager
def _locked(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ForgetfulError(f"{path} is not valid JSON: remove it to start the experiment again") from None


def read_results(out: Path) -> tuple[dict, list[dict]]:
    """``(env, rows)`` of an experiment folder (empty when it has none yet)."""
    found = _read_json(out / "results.json", {})
    if isinstance(found, list):  # written before results.json carried its environment
        return {}, found
    if not isinstance(found, dict) or not isinstance(found.get("rows", []), list):
        raise ForgetfulError(f"{out / 'results.json'} is not the results of a forget experiment")
    return found.get("env", {}), found.get("rows", [])


def _record(out: Path, run: str, rows: list[dict], per_example: dict, env: dict, config, training) -> list[dict]:
    """Replace ``run``'s rows and examples in the folder's files (atomically, under the lock) and
    write the report again; returns every row."""
    with _locked(out):
        _, found = read_results(out)
        found = [r for r in found if r["run"] != run] + rows
        examples = _read_json(out / "per_example.json", {})
        examples[run] = per_example
        add_intervals(found, examples, config.bootstrap, training.seed)
        write_json(examples, out / "per_example.json")
        write_json(
            {"env": env, "config": {**asdict(config), "training": asdict(training)}, "rows": found},
            out / "results.json",
        )
        _report(found, config, training, out)
    return found


def add_intervals(rows: list[dict], examples: dict, resamples: int, seed: int) -> None:
    """Every learned row: ``ci95`` of its NLL minus the best baseline's at the same protocol and keep
    ratio (the best baseline: the lowest NLL among strategies that are not learned, the full context
    excepted), from a paired bootstrap over held-out groups."""
    learned = set(mask_names(learned=True))
    for r in rows:
        if r["protocol"] == "policy_training" or parse_strategy(r["strategy"])[0] not in learned:
            continue
        peers = [
            p
            for p in rows
            if p["protocol"] == r["protocol"]
            and p["keep_ratio"] == r["keep_ratio"]
            and p["strategy"] != "identity"
            and parse_strategy(p["strategy"])[0] not in learned
        ]
        r.pop("ci95", None)
        if not peers:
            continue
        best = min(peers, key=lambda p: p["nll"])
        a = examples.get(r["run"], {}).get(f"{r['strategy']}@{r['keep_ratio']:g}")
        b = examples.get(best["run"], {}).get(f"{best['strategy']}@{best['keep_ratio']:g}")
        if a is None or b is None:
            continue
        diff, lo, hi = paired_bootstrap(a, b, resamples=resamples, seed=seed)
        r.update(best_baseline=best["strategy"], diff_vs_best=diff, ci95=[lo, hi])


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
            found = [_train_policy(config, training, base, tok, policy_train, val, strategy, keep, out, autocast)]
            per_example = {}
        else:
            found, per_example = _scored_run(
                config, training, base, tok, train, held, name, protocol, strategy, keep, out, autocast
            )
        for r in found:
            r.update(task=config.task, run=name, seconds=round(time.perf_counter() - start, 1))
        rows = _record(out, name, found, per_example, env, config, training)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _policy_dir(out: Path, strategy: str, keep: float) -> Path:
    return out / "policies" / f"{strategy}_{keep:g}"


def _load_policy(out: Path, strategy: str, keep: float, base) -> LearnedForgetMask:
    folder = _policy_dir(out, strategy, keep)
    if not folder.is_dir():
        raise ForgetfulError(
            f"no trained {strategy} policy for keep {keep:g} in {folder}: run policy_{strategy}_{keep:g} first"
        )
    return LearnedForgetMask.from_pretrained(folder, base).to(next(base.parameters()).device).eval()


def _scored_run(config, training, base, tok, train, held, name, protocol, strategy, keep, out, autocast):
    """A zero-shot run (the base LM, every strategy) or a finetuned one (an LM finetuned on one
    strategy's keep sets, that strategy): its rows and their per-example NLLs."""
    device = next(base.parameters()).device
    learned = set(mask_names(learned=True))
    keeps = config.keep_ratios if keep is None else [keep]
    lm_sequences = epochs = steps = 0
    if protocol == "zero_shot":
        model = base
        loaded = [_load_policy(out, p, keep, base) for p in config.strategies("policies")]
        policies = {p.strategy: p for p in loaded}
        strategies = tuple(config.strategies("zero_shot"))
    else:
        model, _ = load_model(config.model)
        if parse_strategy(strategy)[0] in learned:
            mask = _load_policy(out, strategy, keep, base)
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


def _train_policy(config, training, base, tok, train, val, strategy, keep, out, autocast) -> dict:
    """Train one learned policy on the frozen base LM at ``keep``: warm start, REINFORCE, keep the
    best on the validation rows. Writes the policy, its history and a plot; returns a summary row."""
    device = next(base.parameters()).device
    torch.manual_seed(training.seed)  # the policy's initial weights are a function of the seed alone
    policy = build_mask(strategy, base, learned=True, unit=config.unit, **_policy_options(strategy, config)).to(device)
    val_batches = batches_of(val, training.per_device_batch_size, tok.pad_token_id)

    def val_nll() -> float:
        return evaluate_strategy(
            base, policy, val_batches, keep_ratio=keep, pad_token_id=tok.pad_token_id, device=device, autocast=autocast
        )["nll"]

    history: list[dict] = []
    candidates = {"prior": (val_nll(), {k: v.detach().clone() for k, v in policy.state_dict().items()})}
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
    if best is None or candidates["prior"][0] <= best:  # training did not beat the untrained prior
        policy.load_state_dict(candidates["prior"][1])
        chosen, best = "prior", candidates["prior"][0]
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
        "val_nll_prior": candidates["prior"][0],
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


def _policy_options(strategy: str, config: ForgetExperimentConfig) -> dict:
    options = {"hidden_size": config.policy_hidden_size}
    name = parse_strategy(strategy)[0]
    if name in ("residual", "hidden_state"):
        options["layer"] = config.policy_layer
    if name == "residual":
        options["prior"] = config.prior
    return options


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


# -- the report -----------------------------------------------------------------------------------

COLUMNS = [
    "strategy",
    "keep_ratio",
    "nll",
    "diff_vs_best",
    "ci95",
    "rouge",
    "answer_kept",
    "fact_recall",
    "kept_tokens",
]
COLUMNS_TAIL = ["flops_ratio", "policy_share", "lm_sequences", "epochs"]


def _report(rows: list[dict], config: ForgetExperimentConfig, training: ForgetTrainingConfig, out: Path) -> None:
    """report.md (policy training, then a table and a plot per protocol: strategies ranked by target
    NLL per keep ratio, learned policies highlighted with their interval)."""
    learned = set(mask_names(learned=True))
    parts = [
        f"# Input forgetting, fair protocol: {config.task}\n",
        f"Base LM `{config.model}`. **Zero-shot**: every strategy on the frozen base LM (learned policies were trained "
        "on it, the LM never). **Finetuned**: each strategy on an LM finetuned on its own keep sets, every LM on the "
        f"same rows for the same epochs (`lm_sequences`); learned policies frozen meanwhile. LM learning rate "
        f"{training.lm_learning_rate:g}, batch {training.per_device_batch_size}, seed {training.seed}. `ci95`: paired "
        "bootstrap over held-out groups of a learned row's NLL minus the best baseline's (`diff_vs_best`); negative "
        "is better. `policy_share`: the policy's time over the LM forward it serves.\n",
    ]
    trained = [r for r in rows if r["protocol"] == "policy_training"]
    if trained:
        parts += [
            "## Policy training\n",
            "Validation NLL (training rows held out of policy training) of the untrained prior, after the warm start, "
            "and the best REINFORCE step; `chosen` is the one kept.\n",
            markdown_table(
                sorted(trained, key=lambda r: -r["keep_ratio"]),
                [
                    "strategy",
                    "keep_ratio",
                    "prior",
                    "val_nll_prior",
                    "val_nll_warm_start",
                    "val_nll_best",
                    "chosen",
                    "policy_steps",
                    "num_samples",
                    "seconds_reinforce",
                ],
            ),
        ]
        parts += [
            f"![training at keep {r['keep_ratio']:g}](policies/{r['strategy'].split('@')[0]}_{r['keep_ratio']:g}/training.png)\n"
            for r in trained
        ]
    for protocol in ("zero_shot", "finetuned"):
        picked = sorted((r for r in rows if r["protocol"] == protocol), key=lambda r: (-r["keep_ratio"], r["nll"]))
        if not picked:
            continue
        shown = [c for c in COLUMNS + COLUMNS_TAIL if any(r.get(c) is not None for r in picked)]
        parts += [f"## {protocol.replace('_', ' ')}\n", markdown_table(picked, shown)]
        panels = {}
        for keep in sorted({r["keep_ratio"] for r in picked}, reverse=True):
            bars = [
                {
                    "label": r["strategy"],
                    "value": r["nll"],
                    "highlight": parse_strategy(r["strategy"])[0] in learned,
                    "interval": None,
                }
                for r in picked
                if r["keep_ratio"] == keep and r["strategy"] not in ("identity", "none")
            ]
            panels[f"keep {keep:g}"] = bars
        references = {
            label: next(r["nll"] for r in picked if r["strategy"] == name)
            for label, name in (("full context", "identity"),)
            if any(r["strategy"] == name for r in picked)
        }
        if any(panels.values()):
            plot_ranked_bars(
                panels,
                out / f"nll_{protocol}.png",
                xlabel="target NLL (nats per token)",
                title=f"{config.task}: {protocol.replace('_', ' ')} (orange: learned)",
                levels=references,
            )
            parts.append(f"![{protocol}](nll_{protocol}.png)\n")
    parts.append(f"\nConfig: `{asdict(config)}`\n")
    write_text("\n".join(parts), out / "report.md")


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
