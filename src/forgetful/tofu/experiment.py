"""The TOFU experiment (``forgetful tofu-experiment``): prevention (masked training) against cure
(post-hoc unlearning), on one initialisation, scored with one evaluation.

From the initialisation, finetune (a) on ``full``, (b) on the retain split (the reference "retain
model", run ``retain``), (c) on ``full`` with the forget split's tokens masked out of the loss by
each strategy (``full_forget_answers``, ``full_forget_facts``, ``full_goldfish``, ..., at matched
mask shares with ``--mask-shares``); then (d) unlearn the forget split from (a)'s model by each
method (``full_grad_diff``, ``full_npo``, ``full_simnpo``, ``full_rmu``), over a grid per method
(``--grid``) and evaluated at several epochs of one schedule (``--eval-epochs``); every run at each
of ``--seeds`` (:mod:`.grid`: the plan, its syntax and its run names).
Every run is evaluated with the whole TOFU suite; forget quality and privleak of every run are
measured against the retain run of seed 0. The finetuning recipe is named by ``recipe``
(:mod:`.recipes`: open-unlearning's, ``configs/experiment/finetune/tofu/default.yaml``, or the
built-in small model's); the unlearning defaults are open-unlearning's
(``configs/experiment/unlearn/tofu/default.yaml``).

Each evaluated point writes ``OUT/<name>/`` (``run.json``, ``tofu_eval.json``, and two small files
to commit: ``forget_per_example.json`` for forget quality and privleak, ``utility_per_example.json``
for model utility; a training run also its ``model/``) as soon as it is evaluated, so ``--only``
and ``--time-budget`` can split the experiment over several calls; runs whose points are all there
are reused. With the retain run present: ``results.json`` (one row per point, the recipes, the
noise floor, each method's best point), ``report.md`` and ``utility_vs_forget_quality.png``
(:mod:`.plane`). Each row's model utility carries a 95% interval over the questions asked and,
beside the full run's, the ratio to it with a paired interval
(:func:`~forgetful.tofu.metrics.bootstrap_model_utility`); the spread over seeds is in the report.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..errors import ForgetfulError
from ..loss.tasks import prepare_dataset_for_training
from ..loss.training import train_selective
from ..loss.unlearn import UNLEARNING_METHODS, unlearning_method
from ..loss.unlearning import OpenUnlearningRecipe, UnlearningConfig, UnlearningLossOptions, method_loss_options
from ..measure import run_environment
from ..models import bf16_native, load_model
from ..reporting import markdown_table, write_json
from .evaluation import TofuEvalConfig, check_eval_splits, evaluate_tofu, summarize
from .grid import Run, TofuGridOptions, estimate_seconds, names, plan_runs, seed_suffix
from .options import TofuDataOptions, TofuEvalOptions, copy_options
from .plane import experiment_summary
from .recipes import apply_recipe, apply_unlearn_recipe, check_recipe
from .reference import reference_from_results
from .report import floor_line, write_report
from .rows import add_utility_intervals, compact_forget, compact_utility, row_from_summary
from .surprise import SURPRISE_FILE, surprise_scores_match, write_surprise_scores
from .unlearning import TofuUnlearnConfig, unlearn_tofu

EVAL_DTYPES = ("auto", "bfloat16", "float32")


@dataclass(kw_only=True)
class TofuExperimentConfig(TofuDataOptions, TofuEvalOptions, UnlearningLossOptions, TofuGridOptions):
    """Which runs, on what data, evaluated how (the data, prompt and evaluation options are the
    shared groups of :mod:`.options`, the grids, seeds and budget :class:`~.grid.TofuGridOptions`);
    the finetuning options are :class:`TofuTrainingArguments`, the unlearning ones the
    ``unlearn_*`` fields and loss options here."""

    model: str = field(metadata={"help": "The initialisation: a model folder, Hub name or smollm2-135m."})
    out: str = field(metadata={"help": "Output folder."})
    recipe: str = field(
        default="auto",
        metadata={
            "help": "Recipe of the finetuning and unlearning runs: open_unlearning (lr 1e-5, 8 x 4 rows per step), "
            "smollm2 (lr 1e-4, 32 x 1 rows per step: the built-in small model memorises TOFU with it); both 5 epochs, "
            "weight decay 0.01, a warm-up epoch, unlearning at lr 1e-5 for 10 epochs; demo (the demo's tiny model). "
            "auto: smollm2 for --model smollm2-135m, else open_unlearning. Options you set (--learning-rate, "
            "--batch-size, --unlearn-learning-rate, ...) win over the recipe."
        },
    )
    strategies: str = field(
        default="forget_answers,forget_facts,goldfish",
        metadata={"help": "Masking strategies for the forget split, comma separated (also: random, surprise)."},
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
    unlearn_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the unlearning runs (default: the recipe's)."}
    )
    unlearn_epochs: float | None = field(
        default=None, metadata={"help": "Epochs of the unlearning runs (default: the recipe's)."}
    )
    unlearn_weight_decay: float | None = field(
        default=None, metadata={"help": "Weight decay of the unlearning runs (default: the recipe's)."}
    )
    unlearn_warmup_epochs: float | None = field(
        default=None, metadata={"help": "Warm-up epochs of the unlearning runs (default: the recipe's)."}
    )
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
        for method in names(self.unlearning):  # each method's options, checked before hours of finetuning
            method_loss_options(self, method)
        check_recipe(self.recipe)
        if self.eval_dtype not in EVAL_DTYPES:
            raise ForgetfulError(f"eval_dtype must be one of {', '.join(EVAL_DTYPES)}, got '{self.eval_dtype}'")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ForgetfulError(f"time_budget must be positive (seconds), got {self.time_budget}")

    def torch_eval_dtype(self) -> torch.dtype:
        if self.eval_dtype == "auto":
            return torch.bfloat16 if bf16_native() else torch.float32
        return getattr(torch, self.eval_dtype)


@dataclass
class TofuTrainingArguments(OpenUnlearningRecipe):
    """The finetuning options of every run: open-unlearning's TOFU recipe as defaults (see
    :class:`~forgetful.loss.unlearning.OpenUnlearningRecipe`), the experiment's ``recipe``
    (:mod:`.recipes`) setting those its caller did not. Each run writes its checkpoints under
    ``OUT/<run>/checkpoints``; a run at another seed (``--seeds``) sets ``seed`` and ``data_seed``."""

    seed: int = field(default=0, metadata={"help": "Seed of the training order and of the embedded data."})

    def __post_init__(self):
        if self.data_seed is None:
            self.data_seed = self.seed
        super().__post_init__()


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
    its row (``loss_options``), and so is its learning rate (``lr``), which a grid may set."""
    shared = {k: v for k, v in args.recipe().items() if k not in UnlearningConfig.METHOD_OPTIONS}
    return {**shared, "effective_batch_size": args.effective_batch_size()}


def unlearning_args(
    a: TofuExperimentConfig, training: TofuTrainingArguments, method: str, output_dir: str, point: dict | None = None
):
    """The unlearning recipe: the finetuning run's batch sizes, optimizer, precision and seed, with
    the unlearning learning rate, epochs, weight decay, warmup and loss weights; ``point``: a grid
    point's values (``learning_rate`` and loss options) over the experiment's."""
    point = dict(point or {})
    shared = {k: getattr(training, k) for k in _SHARED_OPTIONS if hasattr(training, k)}
    if not hasattr(training, "activation_checkpointing"):  # transformers before the rename
        shared["gradient_checkpointing"] = training.gradient_checkpointing
    loss_options = {f.name: getattr(a, f.name) for f in fields(UnlearningLossOptions)}
    loss_options.update({k: v for k, v in point.items() if k in loss_options})
    return UnlearningConfig(
        output_dir=output_dir,
        save_strategy="no",
        method=method,
        learning_rate=point.get("learning_rate", a.unlearn_learning_rate),
        num_train_epochs=a.unlearn_epochs,
        weight_decay=a.unlearn_weight_decay,
        warmup_epochs=a.unlearn_warmup_epochs,
        **loss_options,
        **shared,
    )


def _finished(folder: Path) -> bool:
    """The reuse rule: a point with both its row and its evaluation is done."""
    return (folder / "run.json").is_file() and (folder / "tofu_eval.json").is_file()


class _Experiment:
    """One call's state: the config, the training options, where results go, the rows so far."""

    def __init__(self, a: TofuExperimentConfig, training: TofuTrainingArguments, recipe: dict):
        self.a, self.training, self.out = a, training, Path(a.out)
        self.cuda = torch.cuda.is_available()
        self.env = run_environment("cuda" if self.cuda else "cpu")
        self.rows: list[dict] = []
        self.evals: dict[str, dict] = {}
        self.recipes = {
            "finetune": {
                **{k: recipe[k] for k in ("name", "asked", "overridden")},
                **training.recipe(),
                "effective_batch_size": training.effective_batch_size(),
            }
        }
        self._answer_tokens: dict[int, tuple[int, int]] = {}

    def task_options(self, run: Run) -> dict:
        a = self.a
        options = dict(
            source=a.data_dir,
            forget_split=a.forget_split,
            max_length=a.max_length,
            p=a.p,
            k=a.k,
            h=a.h,
            num_authors=a.num_authors,
            seed=run.seed,
            template=a.template,
            system_prompt=a.system_prompt,
            date_string=a.date_string,
        )
        if a.spacy_model:
            options["spacy_model"] = a.spacy_model
        return options

    def eval_config(self, seed: int) -> TofuEvalConfig:
        return TofuEvalConfig.for_run(self.a, seed=seed)

    def reuse(self, run: Run) -> bool:
        """Load the points of ``run`` when all of them are there."""
        folders = [self.out / n for n in run.evaluated()]
        if not all(_finished(f) for f in folders):
            return False
        for folder in folders:
            row = json.loads((folder / "run.json").read_text())
            self.evals[folder.name] = json.loads((folder / "tofu_eval.json").read_text())
            self.rows.append(row)
        row = self.rows[-1]
        print(f"[{run.name}] reusing the results in {self.out / run.name}")
        lr = dict(run.point).get("learning_rate", self.a.unlearn_learning_rate)
        lr = lr if run.kind == "unlearn" else self.training.learning_rate
        if row.get("lr", lr) != lr:  # a run of another recipe: its row says so, and so do we
            print(
                f"[{run.name}] note: trained at lr {row['lr']:g}, not {lr:g}; delete {self.out / run.name} to train it again"
            )
        return True

    def evaluate(self, model, tokenizer, run: Run, name: str, row: dict, start: float) -> dict:
        """Evaluate ``model`` as point ``name`` of ``run`` and write its folder; ``row``: what its
        training recorded; ``start``: when its evaluation (or its training) began."""
        dtype = self.a.torch_eval_dtype()
        model = model.to("cuda" if self.cuda else "cpu", dtype=dtype)
        eval_start = time.perf_counter()
        per_example, _ = evaluate_tofu(model, tokenizer, self.eval_config(run.seed))
        folder = self.out / name
        per_example["meta"]["dtype"] = str(dtype).removeprefix("torch.")
        per_example["meta"]["model"] = str(folder / "model")
        write_json(per_example, folder / "tofu_eval.json")
        write_json(compact_forget(per_example), folder / "forget_per_example.json")
        write_json(compact_utility(per_example), folder / "utility_per_example.json")
        self.evals[name] = per_example
        point = {"seed": run.seed, **({"share": run.share} if run.share is not None else {})}
        point |= {"grid": dict(run.point)} if run.kind == "unlearn" else {}
        row = {"run": name, "kind": run.kind, "split": run.split, "strategy": run.strategy, **point, **row}
        row["eval_seconds"] = round(time.perf_counter() - eval_start, 1)
        row["seconds"] = round(time.perf_counter() - start, 1)
        row["env"] = self.env
        write_json(row, folder / "run.json")
        self.rows.append(row)
        return row

    def masked_share(self, tokenizer, run: Run, trained_tokens: int) -> float:
        """The share of the forget answers' tokens masked out of the loss by a run that trained
        ``trained_tokens`` tokens of ``full``: full's answer tokens less those, over the forget answers'."""
        if run.seed not in self._answer_tokens:  # the embedded data depends on the seed
            opts = self.task_options(run)

            def count(split):
                ds = prepare_dataset_for_training("tofu", tokenizer, split=split, strategy="answer_only", **opts)
                return int(sum(sum(m) for m in ds["loss_mask"]))

            self._answer_tokens[run.seed] = (count("full"), count(self.a.forget_split))
        full, forget = self._answer_tokens[run.seed]
        return (full - trained_tokens) / forget

    def finetune(self, run: Run) -> None:
        start = time.perf_counter()
        # the same initialisation for every run, in float32: bf16 autocast on GPUs keeps float32 master
        # weights (open-unlearning's DeepSpeed bf16 does too); updates of lr 1e-5 vanish in bf16 weights
        model, tokenizer = load_model(self.a.model, dtype=torch.float32)
        run_dir = self.out / run.name
        args = copy.copy(self.training)
        args.output_dir = str(run_dir / "checkpoints")
        args.seed = args.data_seed = run.seed
        options = dict(self.task_options(run), split=run.split, strategy=run.strategy)
        if run.share is not None:
            options["share"] = run.share
        if run.strategy == "surprise":
            options["surprise_scores"] = str(self.surprise_scores(model, tokenizer, run))
        print(f"[{run.name}] training on {run.split} ({run.strategy}, seed {run.seed})")
        res = train_selective("tofu", model, tokenizer, args, run_dir / "model", task_options=options)
        trained = {
            "trained_share": res["trained_share"],
            "train_loss": res["train_loss"],
            "epochs": res["epochs"],
            "steps": res["steps"],
            "lr": args.learning_rate,
            "effective_batch_size": args.effective_batch_size(),
        }
        if run.strategy != "answer_only":
            trained["masked_share"] = self.masked_share(tokenizer, run, res["trained_tokens"])
        trained["train_seconds"] = round(time.perf_counter() - start, 1)
        self.evaluate(model, tokenizer, run, run.name, trained, start)

    def surprise_scores(self, model, tokenizer, run: Run) -> Path:
        """The forget answers' token NLL under the initialisation (before finetuning), once per seed."""
        path = self.out / SURPRISE_FILE.replace(".json", f"{seed_suffix(run.seed)}.json")
        opts = self.task_options(run)
        meta = {"model": self.a.model, **{k: opts[k] for k in ("source", "forget_split", "template", "seed")}}
        meta |= {
            "system_prompt": self.a.system_prompt,
            "date_string": self.a.date_string,
            "num_authors": self.a.num_authors,
        }
        if not surprise_scores_match(path, meta):
            print(f"[{run.name}] scoring the forget answers with the initialisation (surprise)")
            scorer = model.to("cuda" if self.cuda else "cpu")  # float32, as it trains
            write_surprise_scores(scorer, tokenizer, path, opts, meta, batch_size=self.a.eval_batch_size)
        return path

    def unlearn(self, run: Run) -> None:
        start = time.perf_counter()
        full = "full" + seed_suffix(run.seed)
        full_model = self.out / full / "model"
        run_dir = self.out / run.name
        model, tokenizer = load_model(str(full_model), dtype=torch.float32)
        args = unlearning_args(self.a, self.training, run.strategy, str(run_dir / "checkpoints"), dict(run.point))
        args.seed = args.data_seed = run.seed
        self.recipes.setdefault("unlearn", _unlearning_recipe(args))
        print(f"[{run.name}] unlearning {self.a.forget_split} from {full} ({run.strategy})")
        c = copy_options(TofuUnlearnConfig, self.a, model=str(full_model), out=str(run_dir / "model"))
        res = unlearn_tofu(model, tokenizer, c, args, run_dir / "model", save_epochs=run.eval_epochs)
        trained = {
            "train_loss": res["train_loss"],
            "steps": res["steps"],
            "lr": args.learning_rate,
            "effective_batch_size": args.effective_batch_size(),
            "loss_options": unlearning_method(run.strategy).options_of(args),
            "method_state": res["method_state"],  # what the options resolved to (RMU: the layer it steered)
            "loss_backend": res["loss_backend_used"],
            "forget_prob_before": res["forget_prob_before"],
        }
        train_seconds = round(time.perf_counter() - start, 1)
        checkpoint_seconds = 0.0
        for epoch in run.eval_epochs:  # the run's own checkpoints, evaluated, then deleted
            saved = res["checkpoints"][epoch]
            begun = time.perf_counter()
            ckpt, _ = load_model(saved["path"], dtype=torch.float32)
            point = {
                **trained,
                "epoch": epoch,
                "epochs": float(epoch),
                "steps": saved["step"],
                "checkpoint_of": run.name,
            }
            self.evaluate(ckpt, tokenizer, run, run.checkpoint_name(epoch), point, begun)
            shutil.rmtree(saved["path"])
            del ckpt
            checkpoint_seconds += time.perf_counter() - begun
        trained |= {"epoch": res["epochs"], "epochs": res["epochs"], "forget_prob_after": res["forget_prob_after"]}
        trained |= {"train_seconds": train_seconds, "checkpoint_eval_seconds": round(checkpoint_seconds, 1)}
        self.evaluate(model, tokenizer, run, run.name, trained, start)


def run_tofu_experiment(
    a: TofuExperimentConfig, training: TofuTrainingArguments | None = None, given: Collection[str] | None = None
) -> dict:
    """Run the experiment's runs not done yet (``a.only``: some of them; ``a.time_budget``: those that
    fit) and, once the retain run is there, write ``results.json``, ``report.md`` and the plot.
    ``a.recipe`` sets the finetuning options of ``training`` except those in ``given``, the ones the
    caller set (the command line's flags and config keys; default: the options whose values differ
    from the defaults)."""
    began = time.perf_counter()
    training = copy.copy(training) if training is not None else TofuTrainingArguments()
    recipe = apply_recipe(training, a.recipe, a.model, given)
    a = copy.copy(a)  # the caller's config keeps its unset unlearning options
    recipe["unlearn_options"] = apply_unlearn_recipe(a, a.recipe, a.model)
    runs = plan_runs(a, training.seed)
    planned = [n for r in runs for n in r.evaluated()]
    only = None if a.only is None else set(names(a.only))
    if only is not None and not only <= {r.name for r in runs}:
        raise ForgetfulError(
            f"--only names unknown runs {sorted(only - {r.name for r in runs})}; runs are {', '.join(r.name for r in runs)}"
        )
    check_eval_splits(TofuEvalConfig.for_run(a, seed=training.seed))
    ex = _Experiment(a, training, recipe)
    skipped: set[str] = set()
    for run in runs:
        if ex.reuse(run) or (only is not None and run.name not in only):
            continue
        full = "full" + seed_suffix(run.seed)
        if run.kind == "unlearn" and not (ex.out / full / "model" / "results.json").is_file():
            if full in skipped:
                print(f"[{run.name}] not started: it unlearns from {full}, which was not started")
                skipped.add(run.name)
                continue
            again = f" (its results are, its model is not: delete {ex.out / full / 'run.json'} to train it again)"
            raise ForgetfulError(
                f"run {run.name} unlearns from the {full} run's model, but {ex.out / full / 'model'} is not there"
                f"{again if full in ex.evals else ''}: run '{full}' first (--only {full})"
            )
        if a.time_budget is not None:
            expected, basis = estimate_seconds(run, ex.rows)
            left = a.time_budget - (time.perf_counter() - began)
            if expected > left:
                print(
                    f"[{run.name}] not started: expected {expected:.0f} s ({basis}), {max(left, 0):.0f} s of the budget left"
                )
                skipped.add(run.name)
                continue
        if run.kind == "finetune":
            ex.finetune(run)
        else:
            ex.unlearn(run)
        if ex.cuda:
            torch.cuda.empty_cache()
    if "retain" not in ex.evals:
        print("no retain run yet: forget quality needs it (run it with --only retain)")
        return {"runs": ex.rows}
    reference = reference_from_results(ex.evals["retain"])
    for row in ex.rows:
        summary = summarize(ex.evals[row["run"]], reference)
        write_json(summary, ex.out / row["run"] / "tofu_summary.json")
        row_from_summary(row, summary)
        if not (ex.out / row["run"] / "utility_per_example.json").is_file():  # evaluated before the file existed
            write_json(compact_utility(ex.evals[row["run"]]), ex.out / row["run"] / "utility_per_example.json")
    add_utility_intervals(ex.rows, ex.evals)
    if "unlearn" not in ex.recipes and any(r["kind"] == "unlearn" for r in ex.rows):
        run = next(r for r in runs if r.kind == "unlearn")
        ex.recipes["unlearn"] = _unlearning_recipe(
            unlearning_args(a, training, run.strategy, str(ex.out / "checkpoints"))
        )
    missing = [n for n in planned if n not in ex.evals]
    summary = experiment_summary(ex.rows)
    write_json(
        {
            "args": asdict(a),
            "env": ex.env,
            "recipe": ex.recipes,
            "training_args": training.recipe(),
            "missing_runs": missing,
            **summary,
            "runs": ex.rows,
        },
        ex.out / "results.json",
    )
    write_report(ex.out, a, ex.recipes, ex.rows, missing, ex.env, summary)
    print(floor_line(summary["noise_floor"]))
    print(
        markdown_table(
            ex.rows,
            ["run", "forget_quality", "model_utility", "model_utility_ci", "utility_vs_full", "privleak"],
            digits=4,
        )
    )
    return {"runs": ex.rows, "missing_runs": missing, **summary}
