"""``forgetful unlearn``: post-hoc unlearning of a TOFU forget split (GradAscent, GradDiff, NPO, SimNPO, RMU) on
the selective-loss trainer stack, with open-unlearning's recipe as defaults; ``--evaluate`` scores
the result with the TOFU suite."""

from __future__ import annotations

from pathlib import Path

import torch

from ..loss.unlearning import UnlearningConfig
from ..models import load_model
from ..reporting import write_json
from ..tofu.evaluation import TofuEvalConfig, check_eval_splits, evaluate_tofu, summary_line
from ..tofu.unlearning import TofuUnlearnConfig, unlearn_tofu

ARGUMENTS = (TofuUnlearnConfig, UnlearningConfig)


def run(c: TofuUnlearnConfig, args: UnlearningConfig) -> dict:
    from accelerate import PartialState

    eval_config = None
    if c.evaluate:
        eval_config = TofuEvalConfig.for_run(c, seed=args.seed)
        check_eval_splits(eval_config)  # before training, not after it
    if args.output_dir in (None, "trainer_output"):
        args.output_dir = str(Path(c.out) / "checkpoints")
    # float32 weights: bf16 autocast on GPUs keeps float32 master weights, as mixed precision should
    model, tokenizer = load_model(c.model, dtype=torch.float32)
    results = unlearn_tofu(model, tokenizer, c, args, c.out)
    main = PartialState().is_main_process
    if main:
        print(
            f"{args.method}: {results['steps']} steps; forget probability {results['forget_prob_before']:.4f} -> "
            f"{results['forget_prob_after']:.4f}"
        )
    if eval_config is not None and main:
        model, tokenizer = load_model(c.out)
        if torch.cuda.is_available():
            model = model.to("cuda")
        per_example, summary = evaluate_tofu(model, tokenizer, eval_config, retain_eval=c.retain_eval)
        per_example["meta"]["model"] = c.out
        write_json(per_example, Path(c.out) / "tofu_eval.json")
        write_json(summary, Path(c.out) / "tofu_summary.json")
        print(summary_line(summary))
        results["summary"] = summary
    return results
