"""Pretraining (``forgetful pretrain``): train the base LM as a plain causal LM.

The model is a built-in tiny config (tokenizer trained on the training corpus) or any Hub name
or local folder. Training runs on :class:`SelectiveLossTrainer` with every token trained, so the
same code path (and the same exact loss normalisation) serves pretraining and selective training.
The output folder holds the model and tokenizer (``save_pretrained``), ``results.json`` and a
loss-curve plot; ``results.json`` is written last, so a folder that has it is complete.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.embedded import pretraining_documents
from ..data.sources import EMBEDDED, load_text_corpus
from ..errors import ForgetfulError
from ..models.builtin import BUILTIN_MODELS, is_builtin
from ..models.loading import build_model, count_parameters
from ..reporting import plot_loss_curve, write_json
from .tasks import prepare_dataset_for_training
from .trainer import SelectiveLossConfig, SelectiveLossTrainer


@dataclass
class PretrainConfig:
    """What to pretrain on what: the model, the data and the built-in model's size."""

    out: str = field(metadata={"help": "Output folder (model, tokenizer, results.json, plots)."})
    model: str = field(default="tiny-llama", metadata={"help": "tiny-llama, tiny-gpt2, a Hub name or a local folder."})
    train_file: str | None = field(
        default=None, metadata={"help": "Text/JSON file, folder or Hub dataset; default: the embedded corpus."}
    )
    eval_file: str | None = field(
        default=None,
        metadata={
            "help": "Held-out text; default: a held-out part of the embedded corpus, or 5%% of the training blocks."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config, e.g. wikitext-103-raw-v1."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text in JSON/Hub data."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training row (longer rows are cut)."})
    packing: bool | None = field(
        default=None, metadata={"help": "Pack documents of a --train-file into blocks (default: yes)."}
    )
    vocab_size: int | None = field(
        default=None, metadata={"help": "BPE vocabulary of built-in models (default: theirs)."}
    )
    hidden_size: int | None = field(default=None, metadata={"help": "Width of built-in models (default: theirs)."})
    num_layers: int | None = field(default=None, metadata={"help": "Layers of built-in models (default: theirs)."})
    num_heads: int | None = field(
        default=None, metadata={"help": "Attention heads of built-in models (default: theirs)."}
    )
    embedded_docs: int = field(
        default=16000,
        metadata={"help": "Documents in the embedded training corpus (curriculum: copy documents, then biographies)."},
    )
    embedded_copy_docs: int = field(
        default=9000, metadata={"help": "How many of them are copy documents (they come first)."}
    )
    eval_rows: int = field(default=256, metadata={"help": "At most this many held-out rows are evaluated."})
    resume: bool = field(default=False, metadata={"help": "Resume from the newest checkpoint in OUT/checkpoints."})

    def __post_init__(self):
        for name in (
            "block_size",
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "embedded_docs",
            "eval_rows",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ForgetfulError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class PretrainTrainingArguments(SelectiveLossConfig):
    """Pretraining's training options: :class:`SelectiveLossConfig` with pretraining's defaults
    and its short flags (``--batch-size``, ``--epochs``, ``--warmup-ratio``). ``output_dir``
    defaults to ``OUT/checkpoints``; ``--save-steps 0`` (the default) writes no checkpoints."""

    output_dir: str | None = field(default=None, metadata={"help": "Checkpoints (default: OUT/checkpoints)."})
    per_device_train_batch_size: int = field(
        default=32,
        metadata={
            "aliases": ["--batch_size", "--batch-size"],
            "help": "Rows per device per step (training and evaluation).",
        },
    )
    num_train_epochs: float = field(
        default=1.0, metadata={"aliases": ["--epochs"], "help": "Passes over the training data."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "cosine, linear, constant_with_warmup, ..."})
    warmup_steps: float = field(
        default=0.05,
        metadata={
            "aliases": ["--warmup_ratio", "--warmup-ratio"],
            "help": "Warm-up: a share of the steps (< 1) or a step count.",
        },
    )
    logging_steps: float = field(default=20, metadata={"help": "Log the training loss every N steps."})
    save_steps: float = field(default=0, metadata={"help": "Checkpoint every N steps (0: no checkpoints)."})
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Complete checkpoints kept (older ones are deleted)."}
    )
    disable_tqdm: bool | None = field(default=False, metadata={"help": "No progress bars."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the initialisation, the data order and the embedded corpus."}
    )

    def __post_init__(self):
        if self.max_steps == 0 or self.max_steps < -1:
            raise ForgetfulError(f"max_steps must be positive (or -1 for whole epochs), got {self.max_steps}")
        if self.num_train_epochs <= 0:
            raise ForgetfulError(f"epochs must be positive, got {self.num_train_epochs}")
        if self.learning_rate <= 0:
            raise ForgetfulError(f"learning_rate must be positive, got {self.learning_rate}")
        for flag, value in (
            ("batch_size", self.per_device_train_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("logging_steps", self.logging_steps),
        ):
            if value < 1:
                raise ForgetfulError(f"{flag} must be at least 1, got {value}")
        self.per_device_eval_batch_size = self.per_device_train_batch_size
        if self.data_seed is None:
            self.data_seed = self.seed
        self.save_strategy = "steps" if self.save_steps else "no"
        if not self.save_steps:
            self.save_steps = 500  # unused without a save strategy; TrainingArguments wants a positive value
        self.dataloader_num_workers = 0
        super().__post_init__()


def run_pretrain(a: PretrainConfig, args: PretrainTrainingArguments | None = None) -> dict:
    """Train, evaluate and save; returns the results written to ``OUT/results.json``."""
    args = args or PretrainTrainingArguments()
    out = Path(a.out)
    if args.output_dir in (None, "trainer_output"):
        args.output_dir = str(out / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)  # a folder with results.json is a finished run
    embedded = a.train_file is None or a.train_file == EMBEDDED
    if embedded and a.eval_file is not None:
        raise ForgetfulError("--eval-file needs --train-file (the embedded corpus brings its own held-out part)")

    if is_builtin(a.model):
        if embedded:
            corpus_texts = pretraining_documents(
                min(a.embedded_docs, 4000), seed=args.seed, copy_docs=min(a.embedded_copy_docs, 1000)
            )
        else:
            corpus_texts = list(
                load_text_corpus(a.train_file, config_name=a.dataset_config, text_column=a.text_column, seed=args.seed)[
                    "text"
                ]
            )
        model, tokenizer = build_model(
            a.model,
            corpus=corpus_texts,
            vocab_size=a.vocab_size,
            seed=args.seed,
            hidden_size=a.hidden_size,
            num_layers=a.num_layers,
            num_heads=a.num_heads,
            max_positions=max(BUILTIN_MODELS[a.model].max_positions, a.block_size),
        )
    else:
        model, tokenizer = build_model(a.model)
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_pos and a.block_size > max_pos:
        raise ForgetfulError(f"block_size {a.block_size} exceeds the model's {max_pos} positions")

    if embedded:
        # A curriculum (copy documents, then biographies) in a fixed order; loss on what can be
        # predicted from context (second copies, questions and answers) - see tasks.embedded_task.
        train = prepare_dataset_for_training(
            "embedded",
            tokenizer,
            docs=a.embedded_docs,
            copy_docs=a.embedded_copy_docs,
            block_size=a.block_size,
            seed=args.seed,
        )
        evald = prepare_dataset_for_training(
            "embedded",
            tokenizer,
            docs=a.eval_rows,
            copy_docs=a.eval_rows // 4,
            block_size=a.block_size,
            seed=args.seed + 1,
        )
    else:
        packing = a.packing if a.packing is not None else True
        text_opts = dict(
            block_size=a.block_size,
            packing=packing,
            config_name=a.dataset_config,
            text_column=a.text_column,
            seed=args.seed,
        )
        train = prepare_dataset_for_training("text", tokenizer, source=a.train_file, **text_opts)
        if a.eval_file is not None:
            evald = prepare_dataset_for_training("text", tokenizer, source=a.eval_file, **text_opts)
        else:
            if len(train) < 2:
                raise ForgetfulError("the training corpus gives a single block: pass --eval-file or more text")
            n_eval = max(1, len(train) // 20)
            evald = train.select(range(len(train) - n_eval, len(train)))
            train = train.select(range(len(train) - n_eval))
    evald = evald.select(range(min(len(evald), a.eval_rows)))

    if embedded:
        args.train_sampling_strategy = "sequential"
    trainer = SelectiveLossTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evald, processing_class=tokenizer
    )
    start = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=True if a.resume else None)
    runtime = time.perf_counter() - start
    metrics = trainer.evaluate()
    eval_loss = float(metrics["eval_loss"])

    main_process = trainer.is_world_process_zero()  # under a launcher, one process writes the outputs
    if main_process:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    history = [h for h in trainer.state.log_history if "loss" in h]
    if history and main_process:
        marks = {}
        if embedded:  # the loss is on other tokens once the copy documents end: say where
            copy_rows = a.embedded_docs // 4 if a.embedded_copy_docs is None else a.embedded_copy_docs
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            marks["copy documents end; biographies (loss on answers)"] = min(copy_rows, len(train)) / per_step
        plot_loss_curve(
            [h["step"] for h in history],
            [h["loss"] for h in history],
            out / "loss.png",
            title=f"Pretraining {a.model}",
            marks=marks,
        )
    n_tokens = sum(len(x) for x in train["input_ids"])
    results = {
        "model": a.model,
        "train_source": a.train_file or "embedded",
        "eval_source": a.eval_file or ("embedded (held-out seed)" if embedded else "last 5% of training blocks"),
        "objective": "embedded curriculum (loss on second copies, questions and answers)"
        if embedded
        else "causal LM on every token",
        "parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "train_rows": len(train),
        "train_tokens_per_epoch": n_tokens,
        "eval_rows": len(evald),
        "steps": trainer.state.global_step,
        "train_loss": float(train_out.training_loss),
        "eval_loss": eval_loss,
        "eval_ppl": math.exp(eval_loss) if eval_loss < 50 else float("inf"),
        "train_runtime_s": round(runtime, 2),
        "device": str(trainer.args.device),
        "args": asdict(a),
        "training_args": args.recipe(),
    }
    if main_process:
        write_json(results, out / "results.json")
    return results
