"""``forgetful pretrain``: train the base LM as a plain causal LM.

The model is a built-in tiny config (tokenizer trained on the training corpus) or any Hub name
or local folder. Training runs on :class:`SelectiveLossTrainer` with every token trained, so the
same code path (and the same exact loss normalisation) serves pretraining and selective training.
The output folder holds the model and tokenizer (``save_pretrained``), ``results.json`` and a
loss-curve plot; ``results.json`` is written last, so a folder that has it is complete.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import ForgetfulError

logger = logging.getLogger(__name__)


@dataclass
class PretrainArguments:
    out: str = field(metadata={"help": "Output folder (model, tokenizer, results.json, plots)."})
    model: str = field(default="tiny-llama", metadata={"help": "tiny-llama, tiny-gpt2, a Hub name or a local folder."})
    train_file: str | None = field(default=None, metadata={"help": "Text/JSON file, folder or Hub dataset; default: the embedded corpus."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out text; default: a held-out part of the embedded corpus, or 5%% of the training blocks."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config, e.g. wikitext-103-raw-v1."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text in JSON/Hub data."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training row (longer rows are cut)."})
    packing: bool | None = field(default=None, metadata={"help": "Pack documents of a --train-file into blocks (default: yes)."})
    vocab_size: int | None = field(default=None, metadata={"help": "BPE vocabulary of built-in models (default: theirs)."})
    hidden_size: int | None = field(default=None, metadata={"help": "Width of built-in models (default: theirs)."})
    num_layers: int | None = field(default=None, metadata={"help": "Layers of built-in models (default: theirs)."})
    num_heads: int | None = field(default=None, metadata={"help": "Attention heads of built-in models (default: theirs)."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: run the epochs)."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training data."})
    batch_size: int = field(default=32, metadata={"help": "Rows per device per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (cosine schedule)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "cosine, linear, constant_with_warmup, ..."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps spent warming up."})
    weight_decay: float = field(default=0.0)
    embedded_docs: int = field(default=16000, metadata={"help": "Documents in the embedded training corpus (curriculum: copy documents, then biographies)."})
    embedded_copy_docs: int = field(default=9000, metadata={"help": "How many of them are copy documents (they come first)."})
    eval_rows: int = field(default=256, metadata={"help": "At most this many held-out rows are evaluated."})
    seed: int = field(default=0)
    report_to: str = field(default="none", metadata={"help": "none, wandb, tensorboard or all."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: on when a GPU supports it)."})
    resume: bool = field(default=False, metadata={"help": "Resume from the newest checkpoint in OUT/checkpoints."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: no checkpoints)."})
    logging_steps: int = field(default=20)

    def __post_init__(self):
        for name in ("block_size", "batch_size", "gradient_accumulation_steps", "vocab_size", "hidden_size",
                     "num_layers", "num_heads", "embedded_docs", "eval_rows", "logging_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ForgetfulError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ForgetfulError(f"max_steps must be positive (or -1 for whole epochs), got {self.max_steps}")
        if self.epochs <= 0:
            raise ForgetfulError(f"epochs must be positive, got {self.epochs}")
        if self.learning_rate <= 0:
            raise ForgetfulError(f"learning_rate must be positive, got {self.learning_rate}")


def _training_args(a: PretrainArguments, out: Path, eval_steps: int | None):
    from .selective import SelectiveLossConfig

    cuda = torch.cuda.is_available()
    bf16 = a.bf16 if a.bf16 is not None else (cuda and torch.cuda.is_bf16_supported())
    return SelectiveLossConfig(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.batch_size,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        learning_rate=a.learning_rate,
        lr_scheduler_type=a.lr_scheduler_type,
        warmup_steps=a.warmup_ratio,
        weight_decay=a.weight_decay,
        num_train_epochs=a.epochs,
        max_steps=a.max_steps,
        logging_steps=a.logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        save_total_limit=2,
        report_to=a.report_to,
        seed=a.seed,
        data_seed=a.seed,
        bf16=bf16,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def run_pretrain(a: PretrainArguments) -> dict:
    """Train, evaluate and save; returns the results written to ``OUT/results.json``."""
    from .data import EMBEDDED
    from .modeling import BUILTIN_MODELS, build_model, count_parameters, is_builtin
    from .reporting import plot_loss_curve, write_json
    from .selective import SelectiveLossTrainer
    from .tasks import prepare_dataset_for_training

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)  # a folder with results.json is a finished run
    embedded = a.train_file is None or a.train_file == EMBEDDED
    if embedded and a.eval_file is not None:
        raise ForgetfulError("--eval-file needs --train-file (the embedded corpus brings its own held-out part)")

    if is_builtin(a.model):
        if embedded:
            from .synthetic import pretraining_documents

            corpus_texts = pretraining_documents(min(a.embedded_docs, 4000), seed=a.seed,
                                                 copy_docs=min(a.embedded_copy_docs, 1000))
        else:
            from .data import load_text_corpus

            corpus_texts = list(load_text_corpus(a.train_file, config_name=a.dataset_config,
                                                 text_column=a.text_column, seed=a.seed)["text"])
        model, tokenizer = build_model(
            a.model, corpus=corpus_texts, vocab_size=a.vocab_size, seed=a.seed, hidden_size=a.hidden_size,
            num_layers=a.num_layers, num_heads=a.num_heads,
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
        train = prepare_dataset_for_training("embedded", tokenizer, docs=a.embedded_docs,
                                             copy_docs=a.embedded_copy_docs, block_size=a.block_size, seed=a.seed)
        evald = prepare_dataset_for_training("embedded", tokenizer, docs=a.eval_rows, copy_docs=a.eval_rows // 4,
                                             block_size=a.block_size, seed=a.seed + 1)
    else:
        packing = a.packing if a.packing is not None else True
        text_opts = dict(block_size=a.block_size, packing=packing, config_name=a.dataset_config,
                         text_column=a.text_column, seed=a.seed)
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

    args = _training_args(a, out, eval_steps=None)
    if embedded:
        args.train_sampling_strategy = "sequential"
    trainer = SelectiveLossTrainer(model=model, args=args, train_dataset=train, eval_dataset=evald,
                                   processing_class=tokenizer)
    start = time.perf_counter()
    resume = None
    if a.resume:
        from .checkpointing import latest_trainer_checkpoint

        resume = latest_trainer_checkpoint(out / "checkpoints")
    train_out = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - start
    metrics = trainer.evaluate()
    eval_loss = float(metrics["eval_loss"])

    main_process = trainer.is_world_process_zero()  # under a launcher, one process writes the outputs
    if main_process:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    history = [h for h in trainer.state.log_history if "loss" in h]
    if history and main_process:
        plot_loss_curve([h["step"] for h in history], [h["loss"] for h in history], out / "loss.png",
                        title=f"Pretraining {a.model}")
    n_tokens = sum(len(x) for x in train["input_ids"])
    results = {
        "model": a.model,
        "train_source": a.train_file or "embedded",
        "eval_source": a.eval_file or ("embedded (held-out seed)" if embedded else "last 5% of training blocks"),
        "objective": "embedded curriculum (loss on second copies, questions and answers)" if embedded
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
    }
    if main_process:
        write_json(results, out / "results.json")
    return results
