"""Selective-loss training as one call: build a registered task's rows, optionally wrap the model
in a LoRA adapter, train with :class:`~forgetful.loss.trainer.SelectiveLossTrainer`, save the model
and return what was trained. ``forgetful train-selective`` and the TOFU experiment both use it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ForgetfulError
from ..reporting import write_json
from .tasks import prepare_dataset_for_training
from .trainer import SelectiveLossConfig, SelectiveLossTrainer


@dataclass(frozen=True)
class LoraOptions:
    """A PEFT LoRA adapter on every linear layer."""

    r: int = 8
    alpha: int = 16


def wrap_lora(model, options: LoraOptions):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ForgetfulError("--lora needs PEFT: pip install peft") from None
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, task_type="CAUSAL_LM", target_modules="all-linear")
    return get_peft_model(model, config)


def train_selective(
    task: str,
    model,
    tokenizer,
    args: SelectiveLossConfig,
    out: str | os.PathLike,
    *,
    task_options: dict | None = None,
    lora: LoraOptions | None = None,
    resume: bool = False,
) -> dict:
    """Train ``model`` on ``task``'s rows with their loss masks and save it (merged, with LoRA) and its
    tokenizer to ``out``; ``results.json`` there is written last, so a folder with it is complete.
    Under a launcher one process writes. Returns the results."""
    task_options = dict(task_options or {})
    out = Path(out)
    (out / "results.json").unlink(missing_ok=True)
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ForgetfulError(
            "--fsdp shards the model over several processes: launch with torchrun "
            "--nproc_per_node N or accelerate launch --num_processes N"
        )
    train = prepare_dataset_for_training(task, tokenizer, **task_options)
    n_trained = sum(sum(m) for m in train["loss_mask"])
    if n_trained == 0:
        raise ForgetfulError(f"every loss_mask of task '{task}' is all zeros: nothing would be trained")
    if lora is not None:
        model = wrap_lora(model, lora)
    trainer = SelectiveLossTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    final = trainer.model
    main_process = trainer.is_world_process_zero()
    if lora is not None:
        if main_process:
            final.save_pretrained(out / "adapter")
        final = final.merge_and_unload()
    if main_process:
        final.save_pretrained(out)
        tokenizer.save_pretrained(out)
    total = sum(len(x) for x in train["input_ids"])
    results = {
        "task": task,
        "task_options": task_options,
        "rows": len(train),
        "tokens": total,
        "trained_tokens": int(n_trained),
        "trained_share": n_trained / max(total, 1),
        "train_loss": float(result.training_loss),
        "epochs": float(trainer.state.epoch or 0.0),
        "steps": trainer.state.global_step,
        "train_runtime_s": float(result.metrics.get("train_runtime", math.nan)),
        "lora": lora is not None,
    }
    if main_process:
        write_json(results, out / "results.json")
    return results
