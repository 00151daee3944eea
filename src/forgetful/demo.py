"""``forgetful demo``: everything the project does, at small scale, offline, on a CPU.

1. Pretrain a tiny Llama-style LM on the embedded corpus (a curriculum that teaches it to read
   facts back out of biography passages) and evaluate it.
2. Input forgetting: train an MLP forget policy jointly with the LM by REINFORCE at
   keep 0.5, then an RNN policy on the same LM (frozen), and evaluate every strategy at
   keep 1, 0.75, 0.5, 0.25 (quality, FLOPs, time, memory).
3. Loss forgetting: the TOFU experiment on embedded TOFU-shaped data: train on ``full``, on the
   retain split, and on ``full`` with the forget split masked by each strategy; unlearn the
   forget split from the full model with NPO; score them all with the TOFU metrics.
4. The real model (SmolLM2-135M-Instruct), zero-shot: target NLL of text windows (WikiText-2 test
   from ``$FORGETFUL_DATA`` when it is set, else the embedded corpus) when each strategy keeps half
   of the context. Skipped with a note when the model's package is not installed.

Speed is not measured here: on a 2-core CPU the timings of a tiny model are noise. The GPU
benchmarks (``benchmarks/``) measure it.

Writes ``OUT/report.md``, ``OUT/results.json`` and PNG plots (and each stage's own folder).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data.locations import data_root
from .data.sources import load_text_corpus, text_windows, tokenize_stream
from .errors import ForgetfulError
from .input.eval_report import add_speedups, write_report
from .input.evaluation import evaluate_forgetting
from .input.examples import load_forget_examples
from .input.options import DEFAULT_KEEP_RATIO, parse_keep
from .input.policies import MLPForgetMask, RNNForgetMask
from .input.reinforce import ForgetMaskTrainer, ForgetTrainingConfig
from .loss.pretrain import PretrainConfig, PretrainTrainingArguments, run_pretrain
from .models import load_model
from .reporting import markdown_table, plot_bars, plot_lines, plot_scatter, write_json, write_text
from .tofu.experiment import TofuExperimentConfig, TofuTrainingArguments, run_tofu_experiment


@dataclass
class DemoConfig:
    out: str = field(default="runs/demo", metadata={"help": "Output folder."})
    pretrain_docs: int = field(default=24000, metadata={"help": "Embedded pretraining documents."})
    pretrain_copy_docs: int = field(default=14000, metadata={"help": "Of which copy documents (first)."})
    forget_examples: int = field(default=3000, metadata={"help": "Input-forgetting training examples."})
    eval_examples: int = field(default=192, metadata={"help": "Held-out examples for the evaluations."})
    keep: float = field(
        default=DEFAULT_KEEP_RATIO, metadata={"help": "Share of the context the policies keep, in (0, 1)."}
    )
    steps_per_epoch: int = field(default=40, metadata={"help": "REINFORCE steps per epoch (4 epochs)."})
    tofu_authors: int = field(default=20, metadata={"help": "Authors in the embedded TOFU data."})
    tofu_strategies: str = field(
        default="forget_answers,forget_facts,goldfish,random",
        metadata={"help": "Masked-training strategies of the TOFU stage, comma separated."},
    )
    tofu_unlearning: str = field(default="npo", metadata={"help": "Unlearning runs from the full model."})
    seed: int = field(default=0, metadata={"help": "Seed of every stage."})
    skip_tofu: bool = field(default=False, metadata={"help": "Leave out the TOFU part."})
    real_model: str = field(default="smollm2-135m", metadata={"help": "The real model of part 4 (a name or folder)."})
    wikitext: str | None = field(
        default=None,
        metadata={
            "help": "Text of part 4: a file, or wikitext2:test (FORGETFUL_DATA or the Hub). Default: WikiText-2 test "
            "from $FORGETFUL_DATA when it is set, else the embedded corpus (the demo stays offline)."
        },
    )
    real_windows: int = field(default=16, metadata={"help": "Part 4: WikiText-2 windows scored."})
    real_context: int = field(default=128, metadata={"help": "Part 4: context tokens per window."})
    real_target: int = field(default=32, metadata={"help": "Part 4: target tokens per window."})
    skip_real: bool = field(default=False, metadata={"help": "Leave out the real-model part."})

    def __post_init__(self):
        (self.keep,) = parse_keep(self.keep, allow_one=False)
        for name in (
            "pretrain_docs",
            "forget_examples",
            "eval_examples",
            "steps_per_epoch",
            "tofu_authors",
            "real_windows",
            "real_context",
            "real_target",
        ):
            if getattr(self, name) < 1:
                raise ForgetfulError(f"{name} must be at least 1, got {getattr(self, name)}")


def _stage(name: str):
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def run_demo(a: DemoConfig) -> dict:
    torch.manual_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)
    timings: dict[str, float] = {}
    results: dict = {"args": asdict(a), "device": "cuda" if torch.cuda.is_available() else "cpu"}

    # 1. The base LM ------------------------------------------------------------------------
    t = _stage("1/4 pretrain the base LM (embedded corpus)")
    pre = run_pretrain(
        PretrainConfig(
            out=str(out / "base"),
            model="tiny-llama",
            embedded_docs=a.pretrain_docs,
            embedded_copy_docs=a.pretrain_copy_docs,
        ),
        PretrainTrainingArguments(lr_scheduler_type="constant_with_warmup", logging_steps=100, seed=a.seed),
    )
    timings["pretrain"] = time.perf_counter() - t
    results["pretrain"] = {
        k: pre[k]
        for k in ("parameters", "vocab_size", "steps", "eval_loss", "eval_ppl", "train_runtime_s", "objective")
    }

    # 2. Input forgetting --------------------------------------------------------------------
    t = _stage(f"2/4 input forgetting: REINFORCE policies at keep {a.keep:g}")
    model, tok = load_model(str(out / "base"))
    train = load_forget_examples(None, tok, embedded_examples=a.forget_examples, seed=a.seed)
    held_out = load_forget_examples(None, tok, embedded_examples=a.eval_examples, seed=a.seed + 1234)
    common = dict(
        per_device_train_batch_size=16,
        num_samples=4,
        max_steps_per_epoch=a.steps_per_epoch,
        logging_steps=10,
        eval_batches=6,
        seed=a.seed,
    )
    mlp = MLPForgetMask(model, hidden_size=64)
    joint = ForgetMaskTrainer(
        model,
        mlp,
        ForgetTrainingConfig(
            output_dir=str(out / "forget_mlp"),
            learning_rate=5e-4,
            policy_learning_rate=3e-3,
            save_total_limit=1,
            **common,
        ),
        keep_ratio=a.keep,
        exploration_epochs=[0.75, 0.5, 0.25, 0],
        train_dataset=train,
        eval_dataset=held_out,
        tokenizer=tok,
    ).train()
    model = joint.model
    rnn = RNNForgetMask(model, hidden_size=64)
    frozen = ForgetMaskTrainer(
        model,
        rnn,
        ForgetTrainingConfig(
            output_dir=str(out / "forget_rnn"), freeze_lm=True, policy_learning_rate=3e-3, save_total_limit=1, **common
        ),
        keep_ratio=a.keep,
        exploration_epochs=[0.5, 0.25, 0],
        train_dataset=train,
        eval_dataset=held_out,
        tokenizer=tok,
    ).train()
    timings["train_forget"] = time.perf_counter() - t
    for name, run in (("mlp", joint), ("rnn", frozen)):
        hist = [h for h in run.history if "reward" in h]
        plot_lines(
            {"reward": ([h["step"] for h in hist], [h["reward"] for h in hist])},
            out / f"forget_{name}" / "reward.png",
            xlabel="step",
            ylabel="reward (-target NLL)",
            title=f"REINFORCE training of the {name.upper()} policy",
        )
    results["train_forget"] = {"mlp_history": joint.history, "rnn_history": frozen.history}

    t = _stage("evaluate forgetting strategies")
    model.eval()
    rows = evaluate_forgetting(
        model,
        {"mlp": joint.policy, "rnn": frozen.policy},
        held_out,
        keep_ratios=[1.0, 0.75, 0.5, 0.25],
        pad_token_id=tok.pad_token_id,
        batch_size=32,
        timing_repeats=3 if torch.cuda.is_available() else 0,  # CPU timings of a tiny model are noise
        seed=a.seed,
    )
    add_speedups(rows)
    write_report(
        rows,
        out / "eval_forget",
        title="Forgetting strategies on held-out biographies",
        notes="LM jointly trained with the MLP policy; the RNN policy trained on it with the LM frozen.",
    )
    timings["eval_forget"] = time.perf_counter() - t
    results["eval_forget"] = rows

    # 3. Loss forgetting: TOFU ----------------------------------------------------------------
    if not a.skip_tofu:
        t = _stage("3/4 loss forgetting: TOFU masked training (embedded TOFU data)")
        tofu = run_tofu_experiment(
            TofuExperimentConfig(
                model=str(out / "base"),
                out=str(out / "tofu"),
                forget_split="forget10",
                strategies=a.tofu_strategies,
                unlearning=a.tofu_unlearning,
                recipe="demo",  # the tiny model's finetuning and unlearning recipe (tofu/recipes.py)
                max_new_tokens=32,
                eval_batch_size=64,
                num_authors=a.tofu_authors,
            ),
            TofuTrainingArguments(loss_average="tokens", seed=a.seed),
            given=set(),  # every recipe option from the demo recipe
        )
        timings["tofu"] = time.perf_counter() - t
        results["tofu"] = tofu["runs"]
        plot_demo_plane(results["tofu"], out / "tofu" / "demo_plane.png")

    # 4. The real model, zero-shot ----------------------------------------------------------------
    if not a.skip_real:
        t = _stage(f"4/4 the real model ({a.real_model}), zero-shot at keep {a.keep:g}: {real_text_source(a)[1]}")
        results["real_model"] = _real_model_section(a, out / "real_model")
        timings["real_model"] = time.perf_counter() - t

    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["total_s"] = round(sum(timings.values()), 1)
    write_text(_report(results, rows, a), out / "report.md")
    write_json(results, out / "results.json")
    print(f"\nDemo finished in {results['total_s']:.0f} s: {out / 'report.md'}")
    return results


def real_text_source(a: DemoConfig) -> tuple[str | None, str]:
    """(source for load_forget_examples, its name in the report) of part 4: the text asked for, else
    WikiText-2 test from ``$FORGETFUL_DATA``, else the embedded corpus (None)."""
    if a.wikitext is not None:
        return a.wikitext, "WikiText-2 test" if "wikitext" in a.wikitext.lower() else a.wikitext
    if data_root() is not None:
        return "wikitext2:test", "WikiText-2 test ($FORGETFUL_DATA)"
    return None, "the embedded corpus (no data folder given: set FORGETFUL_DATA for WikiText-2)"


def _real_model_section(a: DemoConfig, out: Path) -> dict:
    """Every baseline at the demo's budget on text windows, read by the real model as it comes (no
    finetuning): WikiText-2 when a data folder is given, else windows of the embedded corpus. The
    model package missing is a note in the report, not a failure."""
    try:
        model, tok = load_model(a.real_model)
    except ForgetfulError as exc:
        print(f"skipping the real-model part: {exc}")
        return {"skipped": str(exc)}
    model.eval()
    source, text_name = real_text_source(a)
    if source is None:
        corpus = load_text_corpus(None, embedded_docs=400, seed=a.seed + 7)
        windows = text_windows(tokenize_stream(corpus, tok), a.real_context, a.real_target, max_windows=a.real_windows)
    else:
        windows = load_forget_examples(
            source, tok, context_length=a.real_context, target_length=a.real_target, max_examples=a.real_windows
        )
    keep = a.keep
    rows = evaluate_forgetting(
        model,
        {},
        windows,
        keep_ratios=[keep],
        pad_token_id=tok.pad_token_id,
        batch_size=8,
        timing_repeats=0,
        seed=a.seed,
    )
    write_report(
        rows,
        out,
        title=f"{a.real_model}, zero-shot, {text_name}",
        notes=f"{len(windows)} windows of {a.real_context} context + {a.real_target} target tokens; every strategy "
        f"keeps {keep:g} of the context (identity keeps it all; none keeps only token 0).",
    )
    plot_bars(
        {r["strategy"]: r["nll"] for r in rows if r["strategy"] not in ("identity", "none")},
        out / "nll_at_keep.png",
        ylabel="target NLL (nats per token)",
        title=f"{a.real_model} zero-shot: target NLL at keep {keep:g}",
        levels={"full context": _fmt_row(rows, "identity", keep)["nll"]},
    )
    return {
        "model": a.real_model,
        "text": text_name,
        "windows": len(windows),
        "context": a.real_context,
        "target": a.real_target,
        "rows": rows,
    }


DEMO_UTILITY = (
    "the demo's retain utility: the harmonic mean of the retain set's answer probability and truth ratio (the "
    "benchmark's model utility also needs real-authors and world-facts answers, which a 1 M-parameter model never saw)"
)


def demo_utility(row: dict) -> float:
    """What the tiny model can earn of model utility: the harmonic mean of its retain probability and
    retain truth ratio (:data:`DEMO_UTILITY`), the demo's own figure."""
    a, b = row.get("retain_prob") or 0.0, row.get("retain_truth_ratio") or 0.0
    return 2 * a * b / (a + b) if a > 0 and b > 0 else 0.0


def plot_demo_plane(rows: list[dict], path: Path):
    """Forget quality (log) against :func:`demo_utility`, a point per run, the retain run as reference
    lines; the figure (closed) for inspection."""
    points = {r["run"]: (r["forget_quality"], demo_utility(r)) for r in rows if r.get("forget_quality") is not None}
    retain = next((r for r in rows if r["run"] == "retain"), None)
    return plot_scatter(
        points,
        path,
        xlabel="forget quality (KS p-value against the retain run, log scale)",
        ylabel="retain utility (the demo's own, see the report)",
        title="Demo: masked training against unlearning, embedded TOFU data",
        logx=True,
        references={"retain": (retain["forget_quality"], demo_utility(retain))} if retain else None,
    )


def zero_utility_note(rows: list[dict]) -> list[str]:
    """Why a column of zeros is not a bug: model utility is a harmonic mean, so one part at 0 makes
    it 0, and a 1 M-parameter model answers no real-authors question it never trained on."""
    if not rows or any(r.get("model_utility") != 0 for r in rows):
        return []
    parts = (("real_authors_rouge", "real-authors"), ("world_facts_rouge", "world-facts"), ("retain_rouge", "retain"))
    zero = [label for key, label in parts if all(r.get(key) == 0 for r in rows)]
    which = (
        f"the {' and '.join(zero)} ROUGE is 0 for every run (greedy answers of a 1 M-parameter model share no "
        "word with the references)"
        if zero
        else "in every run some part of it is 0"
    )
    return [
        f"Model utility is 0 for every run: it is a harmonic mean of nine figures and {which}. Read forget "
        "quality and privleak at this scale; the README has the real model's TOFU figures.",
        "",
    ]


def _fmt_row(rows, strategy, keep):
    return next((r for r in rows if r["strategy"] == strategy and abs(r["keep_ratio"] - keep) < 1e-9), None)


def _report(results: dict, rows: list[dict], a: DemoConfig) -> str:
    pre = results["pretrain"]
    keep = a.keep
    ident = _fmt_row(rows, "identity", 1.0)
    at = [r for r in rows if abs(r["keep_ratio"] - keep) < 1e-9 and r["strategy"] != "identity"]
    for r in at:
        r["vs_identity"] = r["nll"] / ident["nll"] - 1 if ident else None
    lines = [
        "# forgetful demo",
        "",
        f"Run on {results['device']} in {results['total_s']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in results['timings_s'].items())}).",
        "",
        "## 1. Base LM",
        "",
        f"tiny-llama, {pre['parameters']:,} parameters, vocabulary {pre['vocab_size']}, {pre['steps']} steps on the "
        f"embedded corpus ({pre['objective']}). Held-out loss {pre['eval_loss']:.3f} (perplexity {pre['eval_ppl']:.2f}).",
        "",
        f"## 2. Input forgetting at keep ratio {keep:g}",
        "",
        "Context = biography passage (facts among filler) + question; target = the answer. NLL is per target token "
        f"on {a.eval_examples} held-out examples; `vs_identity` is the relative NLL increase over the full context; "
        "`fact_recall` is the share of fact tokens kept.",
        "",
        markdown_table(
            sorted(at, key=lambda r: r["nll"]),
            ["strategy", "kept_tokens", "nll", "vs_identity", "fact_recall", "flops_ratio"],
        ),
        f"Identity (full context, {ident['kept_tokens']:.1f} tokens): NLL {ident['nll']:.3f}." if ident else "",
        "",
        "All keep ratios: [eval_forget/report.md](eval_forget/report.md). "
        "![target NLL vs keep ratio](eval_forget/nll_vs_keep.png)",
        "",
        "Speed is not measured here: on a 2-core CPU the timings of a 1 M-parameter model are noise. "
        "`flops_ratio` is the compute a strategy needs against the full context, its own scoring included; "
        "measured GPU speedups are in `benchmarks/results/` (see the README).",
        "",
    ]
    if "tofu" in results:
        lines += [
            "## 3. Loss forgetting: TOFU (embedded data)",
            "",
            f"{a.tofu_authors} fictitious authors x 20 questions; forget10 = the last authors. Masked training "
            f"(`full_<strategy>`) against post-hoc unlearning from the full model (`full_{a.tofu_unlearning}`). "
            "Forget quality: KS-test p-value against the retain run; model utility: harmonic mean of nine retain / "
            "real-authors / world-facts metrics; privleak: Min-K% AUC relative to the retain run's.",
            "",
            markdown_table(
                [{**r, "demo_utility": demo_utility(r)} for r in results["tofu"]],
                ["run", "trained_share", "forget_quality", "demo_utility", "model_utility", "privleak", "retain_rouge"],
                digits=4,
            ),
            f"`demo_utility`: {DEMO_UTILITY}; the plane below plots it (the experiment's own plane, with model "
            "utility, is [tofu/report.md](tofu/report.md)).",
            "",
            "![the demo's retain utility vs forget quality](tofu/demo_plane.png)",
            "",
        ]
        lines += zero_utility_note(results["tofu"])
    real = results.get("real_model")
    if real and "rows" in real:
        keep = a.keep
        ident = _fmt_row(real["rows"], "identity", keep)
        at = [r for r in real["rows"] if r["strategy"] != "identity"]
        for r in at:
            r["vs_identity"] = r["nll"] / ident["nll"] - 1
        lines += [
            f"## 4. The real model, zero-shot: {real['model']}",
            "",
            f"SmolLM2-135M-Instruct as it comes (no finetuning) on {real['windows']} windows of {real['text']}, "
            f"{real['context']} context + {real['target']} target tokens; each strategy keeps {keep:g} of the "
            f"context (token 0 always). Full context: target NLL {ident['nll']:.3f}.",
            "",
            markdown_table(
                sorted(at, key=lambda r: r["nll"]), ["strategy", "kept_tokens", "nll", "vs_identity", "flops_ratio"]
            ),
            "![target NLL at the budget](real_model/nll_at_keep.png)",
            "",
        ]
    elif real:
        lines += ["## 4. The real model", "", f"Skipped: {real['skipped']}.", ""]
    return "\n".join(lines)
