"""The TOFU experiment (``forgetful tofu-experiment``): masked training on TOFU, evaluated with the TOFU suite.

From one initialisation, train (a) on ``full``, (b) on the retain split (the reference "retain
model"), and (c) on ``full`` with the forget split's tokens masked out of the loss by each
strategy; evaluate all; forget quality of every run is the KS test against the retain model's
forget truth ratios. Writes ``results.json``, ``report.md`` (a table) and
``utility_vs_forget_quality.png``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.tofu import RETAIN_FOR_FORGET
from ..errors import ForgetfulError
from ..loss.tasks import TOFU_STRATEGIES
from ..loss.trainer import SelectiveLossConfig
from ..loss.training import train_selective
from ..models import load_model
from ..reporting import markdown_table, plot_scatter, write_json, write_text
from .evaluation import TofuEvalConfig, evaluate_tofu, summarize
from .metrics import forget_quality


@dataclass
class TofuExperimentConfig:
    """Which runs, on what data, evaluated how; the training options are :class:`TofuTrainingArguments`."""

    model: str = field(metadata={"help": "The initialisation: a model folder or Hub name."})
    out: str = field(metadata={"help": "Output folder."})
    data_dir: str | None = field(
        default=None, metadata={"help": "TOFU folder (e.g. ../shared/data/tofu), locuslab/TOFU, or unset for embedded."}
    )
    forget_split: str = field(default="forget10")
    strategies: str = field(
        default="forget_answers,forget_facts,goldfish,random",
        metadata={"help": "Masking strategies for the forget split, comma separated."},
    )
    max_length: int = field(default=256)
    p: float = field(default=0.5, metadata={"help": "random strategy: probability to forget an answer token."})
    k: int = field(default=4, metadata={"help": "goldfish: drop 1 in k."})
    h: int = field(default=13, metadata={"help": "goldfish: hashed context width."})
    max_new_tokens: int = field(default=200)
    eval_batch_size: int = field(default=64)
    max_eval_examples: int | None = field(default=None)
    num_authors: int = field(default=200, metadata={"help": "Authors in the embedded data."})
    only: str | None = field(
        default=None,
        metadata={
            "help": "Run only these runs now (e.g. retain,full); runs with results in OUT are reused, so a long "
            "experiment can be split over several calls."
        },
    )


@dataclass
class TofuTrainingArguments(SelectiveLossConfig):
    """The finetuning recipe of every run: :class:`SelectiveLossConfig` with the experiment's
    defaults and short flags (``--epochs``, ``--batch-size``). Each run writes its checkpoints under
    ``OUT/<run>/checkpoints``."""

    num_train_epochs: float = field(default=5.0, metadata={"aliases": ["--epochs"]})
    learning_rate: float = field(default=1e-4)
    per_device_train_batch_size: int = field(default=16, metadata={"aliases": ["--batch_size", "--batch-size"]})
    lr_scheduler_type: str = field(default="linear")
    warmup_steps: float = field(default=0.05)
    weight_decay: float = field(default=0.01)
    logging_steps: float = field(default=25)
    save_strategy: str = field(default="no")
    seed: int = field(default=0, metadata={"help": "Seed of the training order and of the embedded data."})

    def __post_init__(self):
        if self.data_seed is None:
            self.data_seed = self.seed
        super().__post_init__()


def _runs(a: TofuExperimentConfig) -> list[tuple[str, str, str]]:
    """(run name, training split, strategy)."""
    strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in TOFU_STRATEGIES or s == "answer_only"]
    if bad:
        raise ForgetfulError(
            f"unknown masking strategies {', '.join(bad)}; choose from "
            f"{', '.join(s for s in TOFU_STRATEGIES if s != 'answer_only')}"
        )
    if a.forget_split not in RETAIN_FOR_FORGET:
        raise ForgetfulError(f"forget split must be one of {', '.join(RETAIN_FOR_FORGET)}, got '{a.forget_split}'")
    return [("retain", RETAIN_FOR_FORGET[a.forget_split], "answer_only"), ("full", "full", "answer_only")] + [
        (f"full_{s}", "full", s) for s in strategies
    ]


def run_tofu_experiment(a: TofuExperimentConfig, training: TofuTrainingArguments | None = None) -> dict:
    training = training or TofuTrainingArguments()
    runs = _runs(a)
    only = None if a.only is None else {r.strip() for r in a.only.split(",") if r.strip()}
    if only is not None and not only <= {name for name, _, _ in runs}:
        raise ForgetfulError(
            f"--only names unknown runs {sorted(only - {n for n, _, _ in runs})}; "
            f"runs are {', '.join(n for n, _, _ in runs)}"
        )
    out = Path(a.out)
    cuda = torch.cuda.is_available()
    eval_config = TofuEvalConfig(
        data_dir=a.data_dir,
        forget_split=a.forget_split,
        max_new_tokens=a.max_new_tokens,
        batch_size=a.eval_batch_size,
        max_examples=a.max_eval_examples,
        num_authors=a.num_authors,
        seed=training.seed,
    )
    rows, evals = [], {}
    for name, split, strategy in runs:
        run_dir = out / name
        if (run_dir / "run.json").is_file() and (run_dir / "tofu_eval.json").is_file():
            row = json.loads((run_dir / "run.json").read_text())
            per_example = json.loads((run_dir / "tofu_eval.json").read_text())
            evals[name] = (per_example, summarize(per_example, None))
            rows.append(row)
            print(f"[{name}] reusing the results in {run_dir}")
            continue
        if only is not None and name not in only:
            continue
        start = time.perf_counter()
        model, tokenizer = load_model(a.model)  # the same initialisation for every run
        run_args = copy.copy(training)
        run_args.output_dir = str(run_dir / "checkpoints")
        task_options = dict(
            source=a.data_dir,
            split=split,
            forget_split=a.forget_split,
            strategy=strategy,
            max_length=a.max_length,
            p=a.p,
            k=a.k,
            h=a.h,
            num_authors=a.num_authors,
            seed=training.seed,
        )
        print(f"[{name}] training on {split} ({strategy})")
        train_res = train_selective("tofu", model, tokenizer, run_args, run_dir / "model", task_options=task_options)
        model = model.to("cuda") if cuda else model
        per_example, summary = evaluate_tofu(model, tokenizer, eval_config)
        per_example["meta"]["model"] = str(run_dir / "model")
        write_json(per_example, run_dir / "tofu_eval.json")
        evals[name] = (per_example, summary)
        row = {
            "run": name,
            "split": split,
            "strategy": strategy,
            "trained_share": train_res["trained_share"],
            "train_loss": train_res["train_loss"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        write_json(row, run_dir / "run.json")
        rows.append(row)
        del model
        if cuda:
            torch.cuda.empty_cache()
    if "retain" not in evals:
        print("no retain run yet: forget quality needs it (run it with --only retain)")
        return {"runs": rows}
    retain_r = evals["retain"][0]["forget"]["truth_ratio"]
    for row in rows:
        per_example, summary = evals[row["run"]]
        summary["forget_quality"] = forget_quality(per_example["forget"]["truth_ratio"], retain_r)
        write_json(summary, out / row["run"] / "tofu_summary.json")
        row.update(
            forget_quality=summary["forget_quality"],
            model_utility=summary["model_utility"],
            forget_rouge=summary["forget"]["rouge"],
            forget_prob=summary["forget"]["prob"],
            forget_truth_ratio=summary["forget"]["truth_ratio"],
            retain_rouge=summary["retain"]["rouge"],
            retain_prob=summary["retain"]["prob"],
        )
    write_json({"args": asdict(a), "training_args": training.recipe(), "runs": rows}, out / "results.json")
    plot_scatter(
        {r["run"]: (max(r["forget_quality"], 1e-30), r["model_utility"]) for r in rows},
        out / "utility_vs_forget_quality.png",
        xlabel="forget quality (KS p-value, log)",
        ylabel="model utility",
        title=f"TOFU {a.forget_split}: masked training",
        logx=True,
    )
    cols = [
        "run",
        "strategy",
        "trained_share",
        "forget_quality",
        "model_utility",
        "forget_rouge",
        "forget_prob",
        "forget_truth_ratio",
        "retain_rouge",
        "retain_prob",
        "seconds",
    ]
    md = (
        f"# TOFU masked training ({a.forget_split})\n\nInitialisation `{a.model}`, data "
        f"`{a.data_dir or 'embedded'}`, {training.num_train_epochs:g} epochs, lr {training.learning_rate:g}. Forget quality is the KS-test "
        "p-value against the retain run (1 = indistinguishable from never training on the forget set); model "
        "utility is the harmonic mean of the nine retain / real-authors / world-facts metrics.\n\n"
        + markdown_table(rows, cols, digits=4)
        + "\n![utility vs forget quality](utility_vs_forget_quality.png)\n"
    )
    write_text(md, out / "report.md")
    print(markdown_table(rows, ["run", "forget_quality", "model_utility", "forget_rouge"], digits=4))
    return {"runs": rows}
