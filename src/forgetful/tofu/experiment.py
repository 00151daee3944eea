"""The TOFU experiment (``forgetful tofu-experiment``): prevention (masked training) against cure
(post-hoc unlearning), on one initialisation, scored with one evaluation.

From the initialisation, finetune (a) on ``full``, (b) on the retain split (the reference "retain
model", run ``retain``), (c) on ``full`` with the forget split's tokens masked out of the loss by
each strategy (``full_forget_answers``, ``full_forget_facts``, ``full_goldfish``, ...); then (d)
unlearn the forget split from (a)'s model by each method (``full_grad_diff``, ``full_npo``,
``full_simnpo``, ``full_rmu``).
Every run is evaluated with the whole TOFU suite; forget quality and privleak of every run are
measured against the retain run. The finetuning recipe is named by ``recipe`` (:mod:`.recipes`:
open-unlearning's, ``configs/experiment/finetune/tofu/default.yaml``, or the built-in small
model's); the unlearning defaults are open-unlearning's (``configs/experiment/unlearn/tofu/default.yaml``).

Each run writes ``OUT/<run>/`` (``model/``, ``run.json``, ``tofu_eval.json``, and two small files
to commit: ``forget_per_example.json`` for forget quality and privleak, ``utility_per_example.json``
for model utility) as soon as it finishes, so ``--only`` can split the experiment over several
calls; runs already there are reused. With the retain run present: ``results.json`` (one row per
run, the recipes), ``report.md`` and ``utility_vs_forget_quality.png`` (log scale). Each row's
model utility carries a 95% interval over the questions asked and, beside the full run's, the
ratio to it with a paired interval (:func:`~forgetful.tofu.metrics.bootstrap_model_utility`): the
runs are single seeds, so this is the uncertainty of the evaluation, not of the training.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..data.tofu import RETAIN_FOR_FORGET
from ..errors import ForgetfulError
from ..loss.tasks import TOFU_STRATEGIES
from ..loss.training import train_selective
from ..loss.unlearning import (
    UNLEARNING_METHODS,
    OpenUnlearningRecipe,
    UnlearningConfig,
    UnlearningLossOptions,
    method_loss_options,
)
from ..loss.unlearning_methods import unlearning_method
from ..measure import run_environment
from ..models import bf16_native, load_model
from ..reporting import markdown_table, write_json
from .evaluation import TofuEvalConfig, check_eval_splits, evaluate_tofu, summarize
from .metrics import UTILITY_METRICS, UTILITY_SETS, bootstrap_model_utility, percentile_interval
from .options import TofuDataOptions, TofuEvalOptions, copy_options
from .recipes import apply_recipe, check_recipe
from .reference import reference_from_results
from .report import write_report
from .unlearning import TofuUnlearnConfig, unlearn_tofu

EVAL_DTYPES = ("auto", "bfloat16", "float32")


@dataclass(kw_only=True)
class TofuExperimentConfig(TofuDataOptions, TofuEvalOptions, UnlearningLossOptions):
    """Which runs, on what data, evaluated how (the data, prompt and evaluation options are the
    shared groups of :mod:`.options`); the finetuning options are :class:`TofuTrainingArguments`,
    the unlearning ones the ``unlearn_*`` fields here."""

    model: str = field(metadata={"help": "The initialisation: a model folder, Hub name or smollm2-135m."})
    out: str = field(metadata={"help": "Output folder."})
    recipe: str = field(
        default="auto",
        metadata={
            "help": "Finetuning recipe: open_unlearning (lr 1e-5, 8 x 4 rows per step), smollm2 (lr 1e-4, "
            "32 x 1 rows per step: the built-in small model memorises TOFU with it); both 5 epochs, weight decay "
            "0.01, a warm-up epoch. auto: smollm2 for --model smollm2-135m, else open_unlearning. Options "
            "you set (--learning-rate, --batch-size, ...) win over the recipe."
        },
    )
    strategies: str = field(
        default="forget_answers,forget_facts,goldfish",
        metadata={"help": "Masking strategies for the forget split, comma separated (also: random)."},
    )
    unlearning: str = field(
        default="grad_diff,npo,simnpo,rmu",
        metadata={
            "help": f"Unlearning methods run from the full model, comma separated ({', '.join(UNLEARNING_METHODS)})."
        },
    )
    p: float = field(default=0.5, metadata={"help": "random strategy: probability to forget an answer token."})
    k: int = field(default=4, metadata={"help": "goldfish: drop 1 in k."})
    h: int = field(default=13, metadata={"help": "goldfish: hashed context width."})
    spacy_model: str | None = field(default=None, metadata={"help": "forget_facts: a spaCy pipeline (default rules)."})
    unlearn_learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of the unlearning runs."})
    unlearn_epochs: float = field(default=10.0, metadata={"help": "Epochs of the unlearning runs."})
    unlearn_weight_decay: float = field(default=0.01, metadata={"help": "Weight decay of the unlearning runs."})
    unlearn_warmup_epochs: float = field(default=1.0, metadata={"help": "Warm-up epochs of the unlearning runs."})
    eval_dtype: str = field(
        default="auto",
        metadata={
            "help": "Evaluate in bfloat16 or float32; auto: bfloat16 on a GPU that supports it (open-unlearning's "
            "default), else float32. Training always keeps float32 weights (bf16 autocast on GPUs)."
        },
    )
    only: str | None = field(
        default=None,
        metadata={
            "help": "Run only these runs now (e.g. retain,full); runs with results in OUT are reused, so a long "
            "experiment can be split over several calls."
        },
    )

    def __post_init__(self):
        self.check_data_options()
        self.check_eval_options()
        for method in _names(self.unlearning):  # each method's options, checked before hours of finetuning
            method_loss_options(self, method)
        check_recipe(self.recipe)
        if self.eval_dtype not in EVAL_DTYPES:
            raise ForgetfulError(f"eval_dtype must be one of {', '.join(EVAL_DTYPES)}, got '{self.eval_dtype}'")

    def torch_eval_dtype(self) -> torch.dtype:
        if self.eval_dtype == "auto":
            return torch.bfloat16 if bf16_native() else torch.float32
        return getattr(torch, self.eval_dtype)


@dataclass
class TofuTrainingArguments(OpenUnlearningRecipe):
    """The finetuning options of every run: open-unlearning's TOFU recipe as defaults (see
    :class:`~forgetful.loss.unlearning.OpenUnlearningRecipe`), the experiment's ``recipe``
    (:mod:`.recipes`) setting those its caller did not. Each run writes its checkpoints under
    ``OUT/<run>/checkpoints``."""

    seed: int = field(default=0, metadata={"help": "Seed of the training order and of the embedded data."})

    def __post_init__(self):
        if self.data_seed is None:
            self.data_seed = self.seed
        super().__post_init__()


@dataclass(frozen=True)
class Run:
    name: str
    kind: str  # finetune | unlearn
    split: str  # the training split (finetune) or the forget split (unlearn)
    strategy: str  # masking strategy (finetune) or unlearning method (unlearn)


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def plan_runs(a: TofuExperimentConfig) -> list[Run]:
    """Every run of the experiment, in the order they depend on each other."""
    if a.forget_split not in RETAIN_FOR_FORGET:
        raise ForgetfulError(f"forget split must be one of {', '.join(RETAIN_FOR_FORGET)}, got '{a.forget_split}'")
    strategies, methods = _names(a.strategies), _names(a.unlearning)
    bad = [s for s in strategies if s not in TOFU_STRATEGIES or s == "answer_only"]
    if bad:
        raise ForgetfulError(
            f"unknown masking strategies {', '.join(bad)}; choose from "
            f"{', '.join(s for s in TOFU_STRATEGIES if s != 'answer_only')}"
        )
    bad = [m for m in methods if m not in UNLEARNING_METHODS]
    if bad:
        raise ForgetfulError(f"unknown unlearning method '{bad[0]}'; choose from {', '.join(UNLEARNING_METHODS)}")
    runs = [
        Run("retain", "finetune", RETAIN_FOR_FORGET[a.forget_split], "answer_only"),
        Run("full", "finetune", "full", "answer_only"),
    ]
    runs += [Run(f"full_{s}", "finetune", "full", s) for s in strategies]
    runs += [Run(f"full_{m}", "unlearn", a.forget_split, m) for m in methods]
    return runs


# The finetuning options that unlearning runs share (the rest is the unlearning recipe's own).
_SHARED_OPTIONS = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "optim",
    "max_grad_norm",
    "sparse_logits",
    "loss_backend",
    "activation_checkpointing",  # transformers 5's name of gradient_checkpointing (the old one warns)
    "bf16",
    "use_cpu",
    "seed",
    "data_seed",
    "logging_steps",
    "report_to",
    "disable_tqdm",
    "dataloader_num_workers",
)


def _unlearning_recipe(args: UnlearningConfig) -> dict:
    """What every unlearning run shares (optimiser, schedule, batch); each run's own loss options are in
    its row (``loss_options``)."""
    shared = {k: v for k, v in args.recipe().items() if k not in UnlearningConfig.METHOD_OPTIONS}
    return {**shared, "effective_batch_size": args.effective_batch_size()}


def unlearning_args(a: TofuExperimentConfig, training: TofuTrainingArguments, method: str, output_dir: str):
    """The unlearning recipe: the finetuning run's batch sizes, optimizer, precision and seed, with
    the unlearning learning rate, epochs, weight decay, warmup and loss weights."""
    shared = {k: getattr(training, k) for k in _SHARED_OPTIONS if hasattr(training, k)}
    if not hasattr(training, "activation_checkpointing"):  # transformers before the rename
        shared["gradient_checkpointing"] = training.gradient_checkpointing
    return UnlearningConfig(
        output_dir=output_dir,
        save_strategy="no",
        method=method,
        learning_rate=a.unlearn_learning_rate,
        num_train_epochs=a.unlearn_epochs,
        weight_decay=a.unlearn_weight_decay,
        warmup_epochs=a.unlearn_warmup_epochs,
        **{f.name: getattr(a, f.name) for f in fields(UnlearningLossOptions)},
        **shared,
    )


def _row_from_summary(row: dict, summary: dict) -> dict:
    row.update(
        forget_quality=summary["forget_quality"],
        model_utility=summary["model_utility"],
        privleak=summary.get("privleak"),
        extraction_strength=summary.get("extraction_strength"),
        mia_auc=summary.get("mia_auc"),
        forget_rouge=summary["forget"]["rouge"],
        forget_prob=summary["forget"]["prob"],
        forget_truth_ratio=summary["forget"]["truth_ratio"],
        # model utility's nine parts: which of them moves the harmonic mean
        **{f"{s}_{m}": summary[s][m] for s in UTILITY_SETS for m in UTILITY_METRICS},
    )
    return row


def _compact(per_example: dict) -> dict:
    """What forget quality and privleak need, per example (a small file to commit)."""
    f = per_example["forget"]
    out = {
        "meta": per_example["meta"],
        "forget": {k: f[k] for k in ("truth_ratio", "min_k", "extraction_strength", "rouge", "prob") if k in f},
    }
    if "holdout" in per_example:
        out["holdout"] = {"min_k": per_example["holdout"]["min_k"]}
    return out


def _compact_utility(per_example: dict) -> dict:
    """What model utility and its interval need, per example of each utility set (a small file to
    commit)."""
    return {"meta": per_example["meta"], **{s: {k: per_example[s][k] for k in UTILITY_METRICS} for s in UTILITY_SETS}}


def add_utility_intervals(rows: list[dict], evals: dict, seed: int = 0) -> None:
    """Each row's model utility with its 95% bootstrap interval over the questions and, when the
    full run is there with a non-zero utility, its ratio to the full run's with the paired
    interval (the same resampled questions for both runs). ``seed`` is the resampling's; at its
    default a row's interval is the one its ``tofu_summary.json`` has (:func:`.evaluation.summarize`)."""
    try:
        samples = bootstrap_model_utility({r["run"]: evals[r["run"]] for r in rows}, seed=seed)
    except ValueError as exc:
        raise ForgetfulError(
            f"model utility's interval compares runs on the same questions, but {exc}: evaluate every run with "
            "the same --max-eval-examples (delete the runs evaluated otherwise to run them again)"
        ) from None
    full_row = next((r for r in rows if r["run"] == "full"), None)
    full = samples.get("full")
    for row in rows:
        utility = samples[row["run"]]
        row["model_utility_ci"] = list(percentile_interval(utility))
        if full_row is not None and full_row["model_utility"] > 0 and full.min() > 0:
            row["utility_vs_full"] = row["model_utility"] / full_row["model_utility"]
            row["utility_vs_full_ci"] = list(percentile_interval(utility / full))


def run_tofu_experiment(
    a: TofuExperimentConfig, training: TofuTrainingArguments | None = None, given: Collection[str] | None = None
) -> dict:
    """Run the experiment's runs not done yet (``a.only``: some of them) and, once the retain run is
    there, write ``results.json``, ``report.md`` and the plot. ``a.recipe`` sets the finetuning
    options of ``training`` except those in ``given``, the ones the caller set (the command line's
    flags and config keys; default: the options whose values differ from the defaults)."""
    training = copy.copy(training) if training is not None else TofuTrainingArguments()
    recipe = apply_recipe(training, a.recipe, a.model, given)
    runs = plan_runs(a)
    names = [r.name for r in runs]
    only = None if a.only is None else set(_names(a.only))
    if only is not None and not only <= set(names):
        raise ForgetfulError(f"--only names unknown runs {sorted(only - set(names))}; runs are {', '.join(names)}")
    out = Path(a.out)
    cuda = torch.cuda.is_available()
    eval_config = TofuEvalConfig.for_run(a, seed=training.seed)
    check_eval_splits(eval_config)
    task_common = dict(
        source=a.data_dir,
        forget_split=a.forget_split,
        max_length=a.max_length,
        p=a.p,
        k=a.k,
        h=a.h,
        num_authors=a.num_authors,
        seed=training.seed,
        template=a.template,
        system_prompt=a.system_prompt,
        date_string=a.date_string,
    )
    if a.spacy_model:
        task_common["spacy_model"] = a.spacy_model
    recipes = {
        "finetune": {
            **{k: recipe[k] for k in ("name", "asked", "overridden")},
            **training.recipe(),
            "effective_batch_size": training.effective_batch_size(),
        }
    }
    env = run_environment("cuda" if cuda else "cpu")
    rows, evals = [], {}
    for run in runs:
        run_dir = out / run.name
        if (run_dir / "run.json").is_file() and (run_dir / "tofu_eval.json").is_file():
            row = json.loads((run_dir / "run.json").read_text())
            evals[run.name] = json.loads((run_dir / "tofu_eval.json").read_text())
            rows.append(row)
            print(f"[{run.name}] reusing the results in {run_dir}")
            lr = a.unlearn_learning_rate if run.kind == "unlearn" else training.learning_rate
            if row.get("lr", lr) != lr:  # a run of another recipe: its row says so, and so do we
                print(f"[{run.name}] note: trained at lr {row['lr']:g}, not {lr:g}; delete {run_dir} to train it again")
            continue
        if only is not None and run.name not in only:
            continue
        start = time.perf_counter()
        if run.kind == "finetune":
            # the same initialisation for every run, in float32: bf16 autocast on GPUs keeps float32 master
            # weights (open-unlearning's DeepSpeed bf16 does too); updates of lr 1e-5 vanish in bf16 weights
            model, tokenizer = load_model(a.model, dtype=torch.float32)
            run_args = copy.copy(training)
            run_args.output_dir = str(run_dir / "checkpoints")
            print(f"[{run.name}] training on {run.split} ({run.strategy})")
            task_options = dict(task_common, split=run.split, strategy=run.strategy)
            res = train_selective("tofu", model, tokenizer, run_args, run_dir / "model", task_options=task_options)
            trained = {
                "trained_share": res["trained_share"],
                "train_loss": res["train_loss"],
                "epochs": res["epochs"],
                "steps": res["steps"],
                "lr": run_args.learning_rate,
                "effective_batch_size": run_args.effective_batch_size(),
            }
        else:
            full_model = out / "full" / "model"
            if not (full_model / "results.json").is_file():
                again = (
                    f" (its results are, its model is not: delete {out / 'full' / 'run.json'} to train it again)"
                    if "full" in evals
                    else ""
                )
                raise ForgetfulError(
                    f"run {run.name} unlearns from the full run's model, but {full_model} is not there{again}: "
                    "run 'full' first (--only full)"
                )
            model, tokenizer = load_model(str(full_model), dtype=torch.float32)
            args = unlearning_args(a, training, run.strategy, str(run_dir / "checkpoints"))
            recipes["unlearn"] = _unlearning_recipe(args)
            print(f"[{run.name}] unlearning {a.forget_split} from the full model ({run.strategy})")
            c = copy_options(TofuUnlearnConfig, a, model=str(full_model), out=str(run_dir / "model"))
            res = unlearn_tofu(model, tokenizer, c, args, run_dir / "model")
            trained = {
                "train_loss": res["train_loss"],
                "epochs": res["epochs"],
                "steps": res["steps"],
                "lr": args.learning_rate,
                "effective_batch_size": args.effective_batch_size(),
                "loss_options": unlearning_method(run.strategy).options_of(args),
                "method_state": res["method_state"],  # what the options resolved to (RMU: the layer it steered)
                "loss_backend": res["loss_backend_used"],
                "forget_prob_before": res["forget_prob_before"],
                "forget_prob_after": res["forget_prob_after"],
            }
        train_seconds = time.perf_counter() - start
        model = model.to("cuda" if cuda else "cpu", dtype=a.torch_eval_dtype())
        per_example, _ = evaluate_tofu(model, tokenizer, eval_config)
        per_example["meta"]["dtype"] = str(a.torch_eval_dtype()).removeprefix("torch.")
        per_example["meta"]["model"] = str(run_dir / "model")
        write_json(per_example, run_dir / "tofu_eval.json")
        write_json(_compact(per_example), run_dir / "forget_per_example.json")
        write_json(_compact_utility(per_example), run_dir / "utility_per_example.json")
        evals[run.name] = per_example
        row = {
            "run": run.name,
            "kind": run.kind,
            "split": run.split,
            "strategy": run.strategy,
            **trained,
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(time.perf_counter() - start - train_seconds, 1),
            "seconds": round(time.perf_counter() - start, 1),
            "env": env,
        }
        write_json(row, run_dir / "run.json")
        rows.append(row)
        del model
        if cuda:
            torch.cuda.empty_cache()
    if "retain" not in evals:
        print("no retain run yet: forget quality needs it (run it with --only retain)")
        return {"runs": rows}
    reference = reference_from_results(evals["retain"])
    for row in rows:
        summary = summarize(evals[row["run"]], reference)
        write_json(summary, out / row["run"] / "tofu_summary.json")
        _row_from_summary(row, summary)
        if not (out / row["run"] / "utility_per_example.json").is_file():  # a run evaluated before the file existed
            write_json(_compact_utility(evals[row["run"]]), out / row["run"] / "utility_per_example.json")
    add_utility_intervals(rows, evals)
    if "unlearn" not in recipes and any(r["kind"] == "unlearn" for r in rows):
        method = next(r["strategy"] for r in rows if r["kind"] == "unlearn")
        recipes["unlearn"] = _unlearning_recipe(unlearning_args(a, training, method, str(out / "checkpoints")))
    missing = [n for n in names if n not in evals]
    write_json(
        {
            "args": asdict(a),
            "env": env,
            "recipe": recipes,
            "training_args": training.recipe(),
            "missing_runs": missing,
            "runs": rows,
        },
        out / "results.json",
    )
    write_report(out, a, recipes, rows, missing, env)
    print(
        markdown_table(
            rows,
            ["run", "forget_quality", "model_utility", "model_utility_ci", "utility_vs_full", "privleak"],
            digits=4,
        )
    )
    return {"runs": rows, "missing_runs": missing}
