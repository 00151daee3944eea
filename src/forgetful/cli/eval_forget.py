"""``forgetful eval-forget``: every strategy at every keep ratio on held-out data (quality, FLOPs,
time, memory); writes ``results.json``, ``report.md`` and plots."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ForgetfulError
from ..input.eval_report import add_speedups, write_report
from ..input.evaluation import BASELINES, evaluate_forgetting
from ..input.examples import load_forget_examples
from ..input.options import TextWindowOptions, parse_keep
from ..input.policies import LearnedForgetMask, mask_names, parse_strategy
from ..input.strategy import split_strategies
from ..models import bf16_autocast, load_model


@dataclass(kw_only=True)
class EvalForgetArguments(TextWindowOptions):
    model: str = field(metadata={"help": "The LM folder (save_pretrained), e.g. a train-forget OUT/lm."})
    out: str = field(metadata={"help": "Output folder for results.json, report.md and plots."})
    mask_dir: list[str] = field(
        default_factory=list, metadata={"help": "Saved learned policies to evaluate (folders)."}
    )
    eval_file: str | None = field(
        default=None, metadata={"help": "Held-out text/JSON file; default: embedded biographies."}
    )
    keep: str = field(default="1,0.75,0.5,0.25", metadata={"help": "Keep ratios, comma separated."})
    strategies: str = field(
        default=",".join(BASELINES),
        metadata={
            "help": "Strategies that are not learned, comma separated, each name[:key=value,...][@unit] (e.g. "
            "recency@sentence, snapkv:layer=4, recency:forget_layer=8, oracle@sentence); unknown names or options are "
            "refused before anything runs."
        },
    )
    max_examples: int = field(default=256, metadata={"help": "At most this many held-out examples (>= 1)."})
    batch_size: int = field(default=16, metadata={"help": "Rows per evaluation batch (>= 1)."})
    timing_repeats: int = field(
        default=5, metadata={"help": "Timed forwards per strategy and keep ratio (0: no timing; >= 0)."}
    )
    embedded_seed: int = field(default=1234, metadata={"help": "Seed of the embedded held-out examples."})
    seed: int = field(default=0, metadata={"help": "Seed of the random baseline and of generated data."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on a GPU that supports it)."})

    def __post_init__(self):
        self.keep_ratios = parse_keep(self.keep)
        self.strategy_names = split_strategies(self.strategies)
        baselines = mask_names(learned=False)
        for spec in map(parse_strategy, self.strategy_names):
            if spec.path is not None or spec.name not in baselines:
                raise ForgetfulError(
                    f"--strategies takes strategies that are not learned ({', '.join(baselines)}), got '{spec}'; "
                    "saved policies go to --mask-dir"
                )
        if self.batch_size < 1 or self.max_examples < 1 or self.timing_repeats < 0:
            raise ForgetfulError("batch_size and max_examples must be at least 1, timing_repeats at least 0")


ARGUMENTS = (EvalForgetArguments,)


def run(a: EvalForgetArguments) -> list[dict]:
    model, tokenizer = load_model(a.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    policies = {}
    for d in a.mask_dir:
        policy = LearnedForgetMask.from_pretrained(d, model)
        name = Path(d).name if Path(d).name not in ("policy",) else Path(d).parent.name
        policies[name] = policy
    ds = load_forget_examples(
        a.eval_file, tokenizer, **a.window_options(), max_examples=a.max_examples, seed=a.embedded_seed
    )
    autocast = bf16_autocast(device) if a.bf16 is not False else None
    if a.bf16 and autocast is None:
        raise ForgetfulError(f"--bf16 true needs a GPU that supports bf16; {device} does not")
    rows = evaluate_forgetting(
        model,
        policies,
        ds,
        keep_ratios=a.keep_ratios,
        pad_token_id=tokenizer.pad_token_id,
        strategies=a.strategy_names,
        batch_size=a.batch_size,
        timing_repeats=a.timing_repeats,
        seed=a.seed,
        autocast=autocast,
    )
    add_speedups(rows)
    notes = (
        f"Model `{a.model}`, data `{a.eval_file or 'embedded biographies'}`, {len(ds)} examples, device "
        f"{device}{', bf16' if autocast else ''}. NLL/perplexity are over target tokens. FLOP ratios count the "
        "policy's own cost; wall time and peak memory are for one forward of the first batch (policy + gather "
        "+ LM), median of repeats."
    )
    write_report(rows, Path(a.out), notes=notes)
    best = min(
        (r for r in rows if r["keep_ratio"] < 1 and r["strategy"] != "identity"), key=lambda r: r["nll"], default=None
    )
    if best:
        print(
            f"wrote {a.out}/report.md; best at keep<1: {best['strategy']} @ {best['keep_ratio']} "
            f"(nll {best['nll']:.3f}, ppl {best['ppl']:.2f})"
        )
    if any(not math.isfinite(r["nll"]) for r in rows):
        raise ForgetfulError("some strategies gave a non-finite NLL; see results.json")
    return rows
