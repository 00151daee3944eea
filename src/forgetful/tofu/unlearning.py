"""Post-hoc unlearning on TOFU (``forgetful unlearn``, and the unlearning runs of the experiment):
open-unlearning's TOFU unlearning recipe (``configs/experiment/unlearn/tofu/default.yaml``) on
:class:`~forgetful.loss.unlearning.UnlearningTrainer`. The forget rows are the forget split
(``forgetXX``), the retain rows the matching ``retainYY``, both encoded by
:func:`~forgetful.data.tofu.encode_qa` exactly as finetuning and evaluation encode them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import TrainerCallback

from ..data.tofu import RETAIN_FOR_FORGET
from ..loss.tasks import prepare_dataset_for_training
from ..loss.unlearning import UnlearningConfig, UnlearningTrainer, forget_probability
from ..nll import model_loss_backend
from ..reporting import write_json
from ..tokens import pad_token_id
from .options import TofuDataOptions, TofuEvalOptions


@dataclass(kw_only=True)
class TofuUnlearnConfig(TofuDataOptions, TofuEvalOptions):
    """What to unlearn and where from (the options of ``forgetful unlearn`` besides the training
    recipe, :class:`~forgetful.loss.unlearning.UnlearningConfig`); the evaluation options apply with
    ``--evaluate``."""

    model: str = field(metadata={"help": "The model to unlearn from (e.g. the TOFU 'full' run's model folder)."})
    out: str = field(metadata={"help": "Output folder: the unlearned model, results.json (and the evaluation)."})
    retain_split: str | None = field(
        default=None, metadata={"help": "Retain rows (default: the retain split of the forget split, e.g. retain90)."}
    )
    evaluate: bool = field(default=False, metadata={"help": "Evaluate the unlearned model with the TOFU suite."})
    retain_eval: str | None = field(
        default=None, metadata={"help": "With --evaluate: the retain model's tofu_eval.json (forget quality)."}
    )

    def __post_init__(self):
        self.check_data_options()
        self.check_eval_options()
        if self.retain_split is None:
            self.retain_split = RETAIN_FOR_FORGET[self.forget_split]

    def task_options(self, seed: int = 0) -> dict:
        return dict(
            source=self.data_dir,
            forget_split=self.forget_split,
            strategy="answer_only",
            max_length=self.max_length,
            num_authors=self.num_authors,
            seed=seed,
            template=self.template,
            system_prompt=self.system_prompt,
            date_string=self.date_string,
        )


class EpochCheckpoints(TrainerCallback):
    """Save the model's weights and the tokenizer at the end of each epoch of ``epochs`` into
    ``folder/epoch-<e>`` (no optimizer state: what an evaluation reads); ``saved``: epoch -> the
    folder and the step it was saved at."""

    def __init__(self, epochs: Collection[int], folder: str | Path, tokenizer):
        self.epochs, self.folder, self.tokenizer = set(epochs), Path(folder), tokenizer
        self.saved: dict[int, dict] = {}

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch or 0.0)
        if epoch in self.epochs and abs(state.epoch - epoch) < 1e-4 and state.is_world_process_zero:
            path = self.folder / f"epoch-{epoch}"
            model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            self.saved[epoch] = {"path": str(path), "step": state.global_step}


def unlearn_tofu(
    model, tokenizer, c: TofuUnlearnConfig, args: UnlearningConfig, out: str | Path, save_epochs: Collection[int] = ()
) -> dict:
    """Unlearn ``c.forget_split`` from ``model`` by ``args.method``, save the model and tokenizer to
    ``out`` and write ``out/results.json`` last. ``save_epochs``: also save the model at the end of
    these epochs, into ``<args.output_dir>/epoch-<e>`` (results' ``checkpoints``: epoch -> folder and
    step; the caller evaluates and deletes them). Returns the results."""
    out = Path(out)
    (out / "results.json").unlink(missing_ok=True)
    start = time.perf_counter()
    options = c.task_options(args.seed)
    forget = prepare_dataset_for_training("tofu", tokenizer, split=c.forget_split, **options)
    retain = (
        prepare_dataset_for_training("tofu", tokenizer, split=c.retain_split, **options) if args.uses_retain else None
    )
    pad = pad_token_id(tokenizer, model)
    trainer = UnlearningTrainer(
        model=model, args=args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
    )
    checkpoints = EpochCheckpoints(save_epochs, args.output_dir, tokenizer)
    if save_epochs:
        trainer.add_callback(checkpoints)
    before = forget_probability(trainer.model, forget, pad)
    result = trainer.train()
    after = forget_probability(trainer.model, forget, pad)
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        trainer.method.save(out)
    results = {
        "method": args.method,
        "model": c.model,
        "forget_split": c.forget_split,
        "retain_split": c.retain_split if args.uses_retain else None,
        "forget_rows": len(forget),
        "retain_rows": len(retain) if retain is not None else 0,
        "recipe": args.recipe(),
        "method_state": trainer.method.state(),
        "loss_backend": trainer.loss_backend,
        # what the option meant for this head and device (auto's choice; dense when sparse logits are off)
        "loss_backend_used": model_loss_backend(
            trainer.loss_backend if args.sparse_logits else "dense", trainer.model, args.device
        ),
        "effective_batch_size": args.effective_batch_size(),
        "warmup_steps": args.warmup_steps,
        "epochs": float(trainer.state.epoch or 0.0),
        "steps": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "train_runtime_s": float(result.metrics.get("train_runtime", math.nan)),
        "forget_prob_before": float(np.mean(before)),
        "forget_prob_after": float(np.mean(after)),
        "checkpoints": checkpoints.saved,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if trainer.is_world_process_zero():
        write_json(results, out / "results.json")
    return results
