"""``forgetful eval-tofu``: score a model with the TOFU suite; writes ``tofu_eval.json`` (per
example) and ``tofu_summary.json`` (aggregates; forget quality and privleak against a retain run),
and with ``--open-unlearning-files`` the same numbers as open-unlearning's ``TOFU_EVAL.json`` and
``TOFU_SUMMARY.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import load_model
from ..reporting import write_json
from ..tofu.evaluation import TofuEvalConfig, evaluate_tofu, summary_line
from ..tofu.open_unlearning import to_open_unlearning


@dataclass
class EvalTofuArguments:
    model: str = field(metadata={"help": "Model folder (save_pretrained) or Hub name."})
    out: str = field(metadata={"help": "Output folder for tofu_eval.json and tofu_summary.json."})
    retain_eval: str | None = field(
        default=None,
        metadata={
            "help": "The retain model's tofu_eval.json (or open-unlearning's TOFU_EVAL.json), for forget quality "
            "and privleak."
        },
    )
    open_unlearning_files: bool = field(
        default=False, metadata={"help": "Also write TOFU_EVAL.json and TOFU_SUMMARY.json in open-unlearning's layout."}
    )


ARGUMENTS = (EvalTofuArguments, TofuEvalConfig)


def run(a: EvalTofuArguments, config: TofuEvalConfig) -> dict:
    model, tokenizer = load_model(a.model)
    if torch.cuda.is_available():
        model = model.to("cuda")
    per_example, summary = evaluate_tofu(model, tokenizer, config, retain_eval=a.retain_eval)
    out = Path(a.out)
    per_example["meta"]["model"] = a.model
    write_json(per_example, out / "tofu_eval.json")
    write_json(summary, out / "tofu_summary.json")
    if a.open_unlearning_files:
        ev, short = to_open_unlearning(per_example, summary)
        write_json(ev, out / "TOFU_EVAL.json")
        write_json(short, out / "TOFU_SUMMARY.json")
    print(summary_line(summary))
    return summary
