"""``forgetful train-selective``: train with per-token loss masks on a registered task.

The task options (split, strategy, block size, ...) and the usual ``TrainingArguments`` (batch
size, learning rate, epochs, ``report_to``, bf16, ...) are flags; ``--lora`` wraps the model in a
PEFT LoRA adapter.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ForgetfulError
from .selective import SelectiveLossConfig


@dataclass
class TrainSelectiveArguments:
    task: str = field(metadata={"help": "Registered task: text, completion, tofu."})
    model: str = field(metadata={"help": "Model folder or Hub name (the initialisation)."})
    out: str = field(metadata={"help": "Output folder: the trained model, results.json."})
    source: str | None = field(default=None, metadata={"help": "Data: a file, folder or Hub name (task-specific; default embedded)."})
    split: str | None = field(default=None, metadata={"help": "tofu: training split (full, retain90, ...)."})
    forget_split: str | None = field(default=None, metadata={"help": "tofu: the forget split (forget01/05/10)."})
    strategy: str | None = field(default=None, metadata={"help": "tofu: answer_only, forget_answers, forget_facts, goldfish, random."})
    mask: str | None = field(default=None, metadata={"help": "text/completion: all, random, goldfish."})
    p: float | None = field(default=None, metadata={"help": "random masks: probability to forget a token."})
    k: int | None = field(default=None, metadata={"help": "goldfish: drop 1 token in k."})
    h: int | None = field(default=None, metadata={"help": "goldfish: hashed context width."})
    block_size: int | None = field(default=None, metadata={"help": "text: tokens per row."})
    max_length: int | None = field(default=None, metadata={"help": "tofu/completion: truncate rows to this length."})
    spacy_model: str | None = field(default=None, metadata={"help": "forget_facts: an installed spaCy pipeline (default: rule-based)."})
    num_authors: int | None = field(default=None, metadata={"help": "tofu, embedded data: number of authors."})
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (PEFT) instead of all weights."})
    lora_r: int = field(default=8)
    lora_alpha: int = field(default=16)
    resume: bool = field(default=False, metadata={"help": "Resume from the newest complete checkpoint in OUT/checkpoints."})

    def task_options(self) -> dict:
        keys = ("source", "split", "forget_split", "strategy", "mask", "p", "k", "h", "block_size", "max_length",
                "spacy_model", "num_authors")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class SelectiveTrainingArguments(SelectiveLossConfig):
    """TrainingArguments for the CLI: output_dir comes from --out."""

    output_dir: str | None = field(default=None, metadata={"help": "Checkpoints (default: OUT/checkpoints)."})
    learning_rate: float = field(default=1e-4)
    num_train_epochs: float = field(default=3.0)
    per_device_train_batch_size: int = field(default=16)
    logging_steps: float = field(default=10)
    save_strategy: str = field(default="no")

    def __post_init__(self):
        # TrainingArguments replaces a missing output_dir with "trainer_output" in the working
        # folder; remember that none was given so the run can put checkpoints under --out.
        self.output_dir_given = self.output_dir is not None
        super().__post_init__()


def _lora(model, r: int, alpha: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ForgetfulError("--lora needs PEFT: pip install peft") from None
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, task_type="CAUSAL_LM", target_modules="all-linear"))


def train_selective(a: TrainSelectiveArguments, targs: SelectiveLossConfig, model=None, tokenizer=None) -> dict:
    """Build the task's dataset, train, save the model to ``OUT`` and return the results."""
    from .modeling import load_model
    from .reporting import write_json
    from .selective import SelectiveLossTrainer
    from .tasks import prepare_dataset_for_training

    out = Path(a.out)
    (out / "results.json").unlink(missing_ok=True)  # only a finished run leaves one
    if targs.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ForgetfulError("--fsdp shards the model over several processes: launch with torchrun "
                             "--nproc_per_node N or accelerate launch --num_processes N")
    if model is None:
        model, tokenizer = load_model(a.model)
    train = prepare_dataset_for_training(a.task, tokenizer, **a.task_options())
    n_trained = sum(sum(m) for m in train["loss_mask"])
    if n_trained == 0:
        raise ForgetfulError(f"every loss_mask of task '{a.task}' is all zeros: nothing would be trained")
    if a.lora:
        model = _lora(model, a.lora_r, a.lora_alpha)
    if not getattr(targs, "output_dir_given", True):
        targs.output_dir = str(out / "checkpoints")
    trainer = SelectiveLossTrainer(model=model, args=targs, train_dataset=train, processing_class=tokenizer)
    result = trainer.train(resume_from_checkpoint=True if a.resume else None)
    final = trainer.model
    main_process = trainer.is_world_process_zero()  # under a launcher, one process writes the outputs
    if a.lora:
        if main_process:
            final.save_pretrained(out / "adapter")
        final = final.merge_and_unload()
    if main_process:
        final.save_pretrained(out)
        tokenizer.save_pretrained(out)
    total = sum(len(x) for x in train["input_ids"])
    results = {
        "task": a.task, "task_options": a.task_options(), "rows": len(train), "tokens": total,
        "trained_tokens": int(n_trained), "trained_share": n_trained / max(total, 1),
        "train_loss": float(result.training_loss), "steps": trainer.state.global_step,
        "train_runtime_s": float(result.metrics.get("train_runtime", math.nan)), "lora": a.lora,
        "args": {k: v for k, v in asdict(a).items()},
    }
    if main_process:
        write_json(results, out / "results.json")
    return results


def run_train_selective(a: TrainSelectiveArguments, targs: SelectiveTrainingArguments) -> dict:
    from accelerate import PartialState

    results = train_selective(a, targs)
    if PartialState().is_main_process:
        print(f"trained {results['steps']} steps on {results['rows']} rows "
              f"({100 * results['trained_share']:.1f}% of tokens in the loss); final loss {results['train_loss']:.4f}")
    return results


CLI_ARGUMENTS = (TrainSelectiveArguments, SelectiveTrainingArguments)
