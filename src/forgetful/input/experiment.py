"""The input-forgetting experiment with a fair protocol (``forgetful forget-experiment``).

Every strategy gets the same chance to adapt, at equal kept budgets and on the same targets:

* ``zero_shot``: each strategy scored on the base LM as it comes;
* ``finetuned``: each strategy scored on an LM finetuned to read that strategy's own compressions
  (identity: finetuned at full context; recency, random, attention-score, ...: one LM each, trained
  at the budget it is scored at), and each learned policy on the LM it was trained jointly with by
  REINFORCE (from the same base LM).

Tasks: ``tofu_qa`` (passages of an author's answers among distractors, then a question; the
question is protected; train on 180 authors, evaluate on the 20 held out; answers also scored by
ROUGE-L recall of greedy generations) and ``text`` (windows of a text file: train on one file,
evaluate on another). Results are written after every run (``results.json``: one row per task,
protocol, strategy and keep ratio), with ``report.md`` and plots; runs already in ``results.json``
are skipped, so an experiment cut short resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState

from ..errors import ForgetfulError, check_choices
from ..models import load_model
from ..reporting import markdown_table, plot_bars, plot_lines, write_json, write_text
from .evaluation import add_speedups, evaluate_forgetting
from .examples import load_forget_examples
from .policies import build_mask, mask_names
from .reinforce import ForgetMaskTrainer, ForgetTrainingConfig, check_exploration


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass
class ForgetExperimentConfig:
    """What the experiment compares; the training options are :class:`ForgetTrainingConfig`'s
    (``--out`` is the experiment's folder; each run writes into a folder of its own there)."""

    model: str = field(metadata={"help": "The base LM: smollm2-135m, a folder or a Hub name."})
    task: Literal["tofu_qa", "text"] = field(default="tofu_qa", metadata={"help": "tofu_qa or text windows."})
    data: str | None = field(default=None, metadata={"help": "tofu_qa: the TOFU folder (default: embedded data)."})
    train_file: str | None = field(default=None, metadata={"help": "text: the training text file."})
    eval_file: str | None = field(default=None, metadata={"help": "text: the held-out text file."})
    context_length: int = field(default=1024, metadata={"help": "text: context tokens per window."})
    target_length: int = field(default=32, metadata={"help": "text: target tokens per window."})
    keeps: str = field(default="0.5", metadata={"help": "Keep ratios, comma separated."})
    zero_shot: str = field(
        default="identity,none,random,recency,self_information,attention_score",
        metadata={"help": "Strategies scored on the base LM."},
    )
    finetuned: str = field(
        default="identity,recency,random,attention_score",
        metadata={"help": "Strategies that each get an LM finetuned on their compressions."},
    )
    policies: str = field(
        default="mlp,hidden_state", metadata={"help": "Learned policies, trained jointly with their LM."}
    )
    exploration: str = field(
        default="0.5,0", metadata={"help": "Learned policies: share of random keep sets per epoch."}
    )
    finetune_epochs: int | None = field(
        default=None,
        metadata={
            "help": "Epochs of LM finetuning for each baseline strategy (default: as many as a learned policy's LM "
            "gets, one per --exploration entry, so every strategy has the same chance to adapt)."
        },
    )
    train_examples: int | None = field(default=None, metadata={"help": "At most this many training examples."})
    eval_examples: int | None = field(default=None, metadata={"help": "At most this many held-out examples."})
    questions_per_author: int = field(default=10, metadata={"help": "tofu_qa: held-out questions per author."})
    num_authors: int = field(default=200, metadata={"help": "tofu_qa on the embedded data: authors generated."})
    eval_batch_size: int = field(default=16)
    max_new_tokens: int = field(default=48, metadata={"help": "tofu_qa: longest generated answer (0: no ROUGE)."})
    timing_repeats: int = field(default=5, metadata={"help": "Timed forwards per strategy (0: no timing)."})
    only: str | None = field(
        default=None, metadata={"help": "Run only these runs now (zero_shot, ft_recency_0.5, ...)."}
    )

    def __post_init__(self):
        check_choices(self)
        try:
            ratios = [float(k) for k in _names(self.keeps)]
        except ValueError:
            raise ForgetfulError(f"keeps must be numbers like 0.5,0.25, got {self.keeps!r}") from None
        if not ratios or any(not 0 < r < 1 for r in ratios):
            raise ForgetfulError(f"keep ratios must lie in (0, 1), got {self.keeps!r}")
        self.keep_ratios = ratios
        try:
            self.exploration_shares = [float(e) for e in _names(self.exploration)]
        except ValueError:
            raise ForgetfulError(f"exploration must be shares like 0.5,0, got {self.exploration!r}") from None
        try:  # before the first run, not when the first policy starts
            check_exploration("reinforce", self.exploration_shares)
        except ForgetfulError as exc:
            raise ForgetfulError(f"--exploration {self.exploration!r}: {exc}") from None
        if self.finetune_epochs is None:
            self.finetune_epochs = len(self.exploration_shares)
        if self.finetune_epochs < 1:
            raise ForgetfulError(f"finetune_epochs must be at least 1, got {self.finetune_epochs}")
        known = set(mask_names())
        for option in ("zero_shot", "finetuned", "policies"):
            unknown = [n for n in _names(getattr(self, option)) if n not in known]
            if unknown:
                raise ForgetfulError(
                    f"{option}: unknown strategies {', '.join(unknown)}; known: {', '.join(sorted(known))}"
                )
        learned = set(mask_names(learned=True))
        if set(_names(self.finetuned)) & learned or not set(_names(self.policies)) <= learned:
            raise ForgetfulError("finetuned takes strategies that are not learned; policies takes learned ones")
        if self.task == "text" and (self.train_file is None or self.eval_file is None):
            raise ForgetfulError("the text task needs --train-file and --eval-file")

    def runs(self) -> list[tuple[str, str, str, float | None]]:
        """(run name, protocol, strategy, keep ratio or None for every ratio), in the order that
        answers the question first: every strategy at the first keep ratio, then at the next."""
        out = [("zero_shot", "zero_shot", "", None)]
        baselines, policies = _names(self.finetuned), _names(self.policies)
        if "identity" in baselines:
            out.append(("ft_identity", "finetuned", "identity", None))
        for k in self.keep_ratios:
            out += [(f"ft_{s}_{k:g}", "finetuned", s, k) for s in baselines if s != "identity"]
            out += [(f"joint_{p}_{k:g}", "finetuned", p, k) for p in policies]
        return out


def run_forget_experiment(config: ForgetExperimentConfig, training: ForgetTrainingConfig) -> list[dict]:
    if training.output_dir is None:
        raise ForgetfulError("--out is required: the experiment's folder")
    out = Path(training.output_dir)
    results_path = out / "results.json"
    rows = _read_rows(results_path)
    done = {r["run"] for r in rows}
    only = None if config.only is None else set(_names(config.only))
    names = {name for name, *_ in config.runs()}
    if only is not None and not only <= names:
        raise ForgetfulError(f"--only names unknown runs {sorted(only - names)}; runs are {', '.join(sorted(names))}")
    base, tok = load_model(config.model)
    train, held = _data(config, tok, training.seed)
    for name, protocol, strategy, keep in config.runs():
        if name in done or (only is not None and name not in only):
            continue
        start = time.perf_counter()
        print(f"[{name}]", flush=True)
        if name == "zero_shot":
            # evaluated without a trainer: on the device a trainer would use (this process's GPU under
            # a launcher), and moved off it again after this run
            cpu = training.use_cpu or not torch.cuda.is_available()
            model, policies, strategies = base.to(PartialState(cpu=cpu).device), {}, tuple(_names(config.zero_shot))
            lm_epochs = 0
        else:
            model, _ = load_model(config.model)
            mask = build_mask(strategy, model, seed=training.seed)
            # no checkpoints: a run takes minutes, and one cut short is run again
            run_args = replace(training, output_dir=None, run_name=name)
            epochs = [0.0] * config.finetune_epochs if not mask.learned else config.exploration_shares
            lm_epochs = len(epochs)
            trainer = ForgetMaskTrainer(
                model,
                mask,
                run_args,
                forget_p=1 - keep if keep else 0.0,
                exploration_epochs=epochs,
                train_dataset=train,
                tokenizer=tok,
            )
            model, mask, _ = trainer.train()
            policies, strategies = {strategy: mask}, ()
        model.eval()
        device = next(model.parameters()).device
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
        found = evaluate_forgetting(
            model,
            policies,
            held,
            keep_ratios=config.keep_ratios if keep is None else [keep],
            pad_token_id=tok.pad_token_id,
            strategies=strategies,
            batch_size=config.eval_batch_size,
            timing_repeats=config.timing_repeats if device.type == "cuda" else 0,
            seed=training.seed,
            autocast=autocast,
            tokenizer=tok,
            max_new_tokens=config.max_new_tokens if config.task == "tofu_qa" else 0,
        )
        add_speedups(found)  # against the identity of the same run (zero_shot), else left empty
        for r in found:
            r.update(
                task=config.task,
                protocol=protocol,
                run=name,
                lm="base" if name == "zero_shot" else name,
                lm_epochs=lm_epochs,  # rows of earlier calls with other settings stay distinguishable
                seconds=round(time.perf_counter() - start, 1),
            )
            r.pop("keeps", None)
        rows = [r for r in rows if r["run"] != name] + found
        write_json(rows, results_path)  # after every run: a run cut short leaves the finished ones
        _report(rows, config, training, out)
        if model is base:
            base.to("cpu")
        else:
            del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _read_rows(path: Path) -> list[dict]:
    import json

    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ForgetfulError(f"{path} is not valid JSON: remove it to start the experiment again") from None
    if not isinstance(rows, list):
        raise ForgetfulError(f"{path} is not the results of a forget experiment (a list of rows)")
    return rows


def _data(config: ForgetExperimentConfig, tok, seed: int):
    if config.task == "tofu_qa":
        from .examples import tofu_qa_examples

        kw = dict(seed=seed, num_authors=config.num_authors)
        train = tofu_qa_examples(tok, config.data, part="train", **kw)
        held = tofu_qa_examples(tok, config.data, part="eval", questions_per_author=config.questions_per_author, **kw)
    else:
        kw = dict(context_length=config.context_length, target_length=config.target_length, seed=seed)
        train = load_forget_examples(config.train_file, tok, **kw)
        held = load_forget_examples(config.eval_file, tok, **kw)
    if config.train_examples is not None:
        train = train.shuffle(seed=seed).select(range(min(config.train_examples, len(train))))
    if config.eval_examples is not None:
        held = held.select(range(min(config.eval_examples, len(held))))
    return train, held


def _report(rows: list[dict], config: ForgetExperimentConfig, training: ForgetTrainingConfig, out: Path) -> None:
    """report.md (a table per protocol) and one plot per protocol: target NLL vs keep ratio (bars when
    there is one keep ratio), with the identity of that protocol and no context as labelled references."""
    qa = config.task == "tofu_qa"
    cols = (
        ["strategy", "keep_ratio", "kept_tokens", "nll"]
        + (["rouge", "fact_recall"] if qa else [])
        + ["flops_ratio", "wall_ms", "lm", "lm_epochs"]
    )
    parts = [
        f"# Input forgetting, fair protocol: {config.task}\n",
        f"Base LM `{config.model}`. Zero-shot: every strategy on the base LM. Finetuned: each strategy on an LM "
        "finetuned to read its own compressions (identity: at full context); learned policies on the LM trained "
        f"jointly with them. LM learning rate {training.lm_learning_rate:g}, batch {training.per_device_batch_size}, "
        f"seed {training.seed}. `wall_ms`: one forward of the first evaluation batch (policy + gather + LM) on the GPU.\n",
    ]
    for protocol in ("zero_shot", "finetuned"):
        picked = sorted((r for r in rows if r["protocol"] == protocol), key=lambda r: (-r["keep_ratio"], r["nll"]))
        if not picked:
            continue
        shown = [c for c in cols if any(r.get(c) is not None for r in picked)]
        parts += [f"## {protocol.replace('_', ' ')}\n", markdown_table(picked, shown)]
        references = {
            label: r["nll"]
            for label, name in (("full context", "identity"), ("no context", "none"))
            for r in picked
            if r["strategy"] == name
        }
        series = {}
        for r in picked:
            if r["strategy"] not in ("identity", "none"):
                xs, ys = series.setdefault(r["strategy"], ([], []))
                xs.append(r["keep_ratio"])
                ys.append(r["nll"])
        keeps = {x for xs, _ in series.values() for x in xs}
        if len(keeps) == 1:  # one budget: a line plot would be a column of dots; bars, best first
            (keep,) = keeps
            plot_bars(
                {name: ys[0] for name, (_, ys) in series.items()},
                out / f"nll_{protocol}.png",
                ylabel="target NLL (nats per token)",
                title=f"{config.task}: {protocol.replace('_', ' ')}, keep {keep:g}",
                levels=references,
            )
            parts.append(f"![{protocol}](nll_{protocol}.png)\n")
        elif series:
            plot_lines(
                {k: (xs, ys) for k, (xs, ys) in series.items()},
                out / f"nll_{protocol}.png",
                xlabel="keep ratio",
                ylabel="target NLL (nats per token)",
                title=f"{config.task}: {protocol.replace('_', ' ')}",
                levels=references,
            )
            parts.append(f"![{protocol}](nll_{protocol}.png)\n")
    parts.append(f"\nConfig: `{asdict(config)}`\n")
    write_text("\n".join(parts), out / "report.md")
