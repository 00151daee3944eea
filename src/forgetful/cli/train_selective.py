"""``forgetful train-selective``: train with per-token loss masks on a registered task.

The task options (split, strategy, block size, ...) and the usual ``TrainingArguments`` (batch
size, learning rate, epochs, ``report_to``, bf16, ...) are flags; ``--lora`` wraps the model in a
PEFT LoRA adapter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..loss.trainer import SelectiveLossConfig
from ..loss.training import LoraOptions, train_selective
from ..models import load_model
from ..tofu.options import TofuPromptOptions, TofuSplitOptions

TASK_OPTIONS = ("source", "split", "strategy", "mask", "p", "k", "h", "block_size", "spacy_model")
TOFU_SPLIT_OPTIONS = tuple(f.name for f in fields(TofuSplitOptions))
TOFU_PROMPT_OPTIONS = tuple(f.name for f in fields(TofuPromptOptions))


@dataclass(kw_only=True)
class TrainSelectiveArguments(TofuSplitOptions, TofuPromptOptions):
    task: str = field(metadata={"help": "Registered task: text, completion, tofu."})
    model: str = field(metadata={"help": "Model folder or Hub name (the initialisation)."})
    out: str = field(metadata={"help": "Output folder: the trained model, results.json."})
    source: str | None = field(
        default=None, metadata={"help": "Data: a file, folder or Hub name (task-specific; default embedded)."}
    )
    split: str | None = field(
        default=None, metadata={"help": "tofu: training split (full, retain90, ..., or a forget split)."}
    )
    strategy: str | None = field(
        default=None, metadata={"help": "tofu: answer_only, forget_answers, forget_facts, goldfish, random."}
    )
    mask: str | None = field(default=None, metadata={"help": "text/completion: all, random, goldfish."})
    p: float | None = field(default=None, metadata={"help": "random masks: probability to forget a token."})
    k: int | None = field(default=None, metadata={"help": "goldfish: drop 1 token in k."})
    h: int | None = field(default=None, metadata={"help": "goldfish: hashed context width."})
    block_size: int | None = field(default=None, metadata={"help": "text: tokens per row."})
    spacy_model: str | None = field(
        default=None, metadata={"help": "forget_facts: an installed spaCy pipeline (default: rule-based)."}
    )
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (PEFT) instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (with --lora)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha (with --lora)."})
    resume: bool = field(
        default=False, metadata={"help": "Resume from the newest complete checkpoint in OUT/checkpoints."}
    )

    def task_options(self) -> dict:
        """The options given for the task (unset ones take the task's defaults); the TOFU split and
        prompt options (shared with the TOFU commands) go to the tofu task, max_length to tofu and
        completion."""
        given = {k: getattr(self, k) for k in TASK_OPTIONS if getattr(self, k) is not None}
        if self.task == "tofu":
            given.update({k: getattr(self, k) for k in (*TOFU_SPLIT_OPTIONS, *TOFU_PROMPT_OPTIONS)})
        elif self.task == "completion":
            given["max_length"] = self.max_length
        return given


@dataclass
class SelectiveTrainingArguments(SelectiveLossConfig):
    """The selective-loss config with this command's defaults; checkpoints go to OUT/checkpoints
    unless --output_dir says otherwise."""

    output_dir: str | None = field(default=None, metadata={"help": "Checkpoints (default: OUT/checkpoints)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the training set."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Rows per process per micro-batch."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    save_strategy: str = field(default="no", metadata={"help": "When to checkpoint: no, steps or epoch."})

    def __post_init__(self):
        # TrainingArguments replaces a missing output_dir with "trainer_output" in the working
        # folder; remember that none was given so the run can put checkpoints under --out.
        self.output_dir_given = self.output_dir is not None
        super().__post_init__()


ARGUMENTS = (TrainSelectiveArguments, SelectiveTrainingArguments)


def run(a: TrainSelectiveArguments, targs: SelectiveTrainingArguments) -> dict:
    from accelerate import PartialState

    if not targs.output_dir_given:
        targs.output_dir = str(Path(a.out) / "checkpoints")
    model, tokenizer = load_model(a.model)
    lora = LoraOptions(a.lora_r, a.lora_alpha) if a.lora else None
    results = train_selective(
        a.task, model, tokenizer, targs, a.out, task_options=a.task_options(), lora=lora, resume=a.resume
    )
    if PartialState().is_main_process:
        print(
            f"trained {results['steps']} steps on {results['rows']} rows "
            f"({100 * results['trained_share']:.1f}% of tokens in the loss); final loss {results['train_loss']:.4f}"
        )
    results["args"] = asdict(a)
    return results
