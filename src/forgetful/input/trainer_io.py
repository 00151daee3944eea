"""What :class:`~.trainer.ForgetMaskTrainer` records besides training: the loop's state
(:class:`TrainerState`), the history, its periodic evaluation (and the best policy it keeps), the
final weights, and atomic checkpoints - ``Accelerator.save_state`` (trained modules, optimizers,
every process's RNG) plus the schedulers and the state registered with it, written under a
temporary name and renamed into place - with their exact resumption."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ForgetfulError
from ..nll import unwrap_model
from ..training.checkpoints import latest_checkpoint, mark_complete, rotate
from .evaluation import baseline_masks, batches_of, evaluate_strategy
from .reinforce_config import Phase

STATE_NAME = "forget_trainer_state.json"
HISTORY_NAME = "history.json"


@dataclass
class TrainerState:
    """The loop's position and what it has seen; checkpointed through Accelerate."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    baseline: float | None = None  # moving-average baseline
    history: list[dict] = field(default_factory=list)
    best_nll: float | None = None  # keep_best: the best held-out NLL so far, its step and weights
    best_step: int | None = None
    best_policy: dict | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, state.get(f.name, getattr(TrainerState(), f.name)))


class TrainerIO:
    """Evaluation, saving and resuming of a :class:`~.trainer.ForgetMaskTrainer` (a mixin: it reads
    the trainer's accelerator, arguments, modules and state)."""

    def evaluate(self) -> dict[str, Any]:
        """Held-out target NLL of the policy (and, with ``eval_baselines``, of the identity, random
        and recency baselines) at the training budget, on ``eval_batches`` batches; appended to the
        history and returned. With ``keep_best``, a policy better than every earlier one is kept."""
        if self.eval_dataset is None:
            return {}
        acc = self.accelerator
        batches = batches_of(
            self.eval_dataset, self.args.per_device_train_batch_size, self.pad_token_id, self.args.eval_batches
        )
        keep = self.keep_ratio
        strategies = {"policy": self.inner_policy}
        if self.args.eval_baselines:
            strategies.update(baseline_masks(self.model, self.args.seed, ("identity", "random", "recency"), acc.device))
        entry: dict[str, Any] = {"step": self.state.global_step, "epoch": self.state.epoch, "eval": True}
        for name, mask in strategies.items():
            res = evaluate_strategy(
                unwrap_model(self.model),
                mask,
                batches,
                keep_ratio=keep,
                pad_token_id=self.pad_token_id,
                keep_first=self.args.keep_first,
                device=acc.device,
                autocast=acc.autocast,
            )
            entry[f"eval_{name}_nll"] = res["nll"]
            for key in ("fact_recall", "answer_kept"):
                if res.get(key) is not None:
                    entry[f"eval_{name}_{key}"] = res[key]
        if self.args.keep_best and (self.state.best_nll is None or entry["eval_policy_nll"] < self.state.best_nll):
            self.state.best_nll, self.state.best_step = entry["eval_policy_nll"], self.state.global_step
            self.state.best_policy = {k: v.detach().cpu().clone() for k, v in self.inner_policy.state_dict().items()}
            entry["best"] = True
        self.state.history.append(entry)
        acc.log(
            {k.replace("eval_", "eval/"): v for k, v in entry.items() if k.startswith("eval_")},
            step=self.state.global_step,
        )
        if acc.is_main_process and not self.args.disable_tqdm:
            acc.print(
                f"eval @ step {self.state.global_step}: "
                + ", ".join(f"{k[5:-4]} {v:.3f}" for k, v in entry.items() if k.endswith("_nll"))
            )
        return entry

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the LM (and tokenizer) to ``output_dir/lm`` and a learned policy to
        ``output_dir/policy`` (default: ``args.output_dir``); one process writes under a launcher."""
        out = Path(output_dir or self.args.output_dir or ".")
        if self.accelerator.is_main_process:
            unwrap_model(self.model).save_pretrained(out / "lm")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(out / "lm")
            if self.learned:
                self.inner_policy.save_pretrained(out / "policy")
        self.accelerator.wait_for_everyone()
        return out

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` atomically: ``Accelerator.save_state`` (trained modules,
        optimizers, RNG of every process, the registered schedulers and loop state) into a
        temporary folder, marked complete and renamed into place by the main process."""
        acc, args = self.accelerator, self.args
        root = Path(args.output_dir)
        final = root / f"checkpoint-{self.state.global_step}"
        tmp = root / f".tmp-checkpoint-{self.state.global_step}"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # tied weights (the LM head and the embeddings) are saved once; Accelerate says so each time
        quiet = logging.getLogger("accelerate.utils.other")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            acc.save_state(str(tmp))
        finally:
            quiet.setLevel(level)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_NAME).write_text(json.dumps({"global_step": self.state.global_step}) + "\n")
            mark_complete(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            rotate(root, args.save_total_limit)
            self._write_history()
        acc.wait_for_everyone()
        return final

    def _write_history(self) -> None:
        from ..reporting import write_json

        if self.args.output_dir and self.accelerator.is_main_process:
            write_json(self.state.history, Path(self.args.output_dir) / HISTORY_NAME)

    def _resume(self, ckpt: Path | None = None) -> None:
        if ckpt is None:
            root = Path(self.args.output_dir) if self.args.output_dir else None
            ckpt = latest_checkpoint(root) if root else None
            if ckpt is None:
                self.accelerator.print("resume: no complete checkpoint found, starting fresh")
                return
        try:
            self.accelerator.load_state(str(ckpt))
        except (OSError, RuntimeError, KeyError, ValueError, EOFError) as exc:
            raise ForgetfulError(
                f"cannot resume from {ckpt}: {str(exc).splitlines()[0]} (a corrupt checkpoint, or one of another run?)"
            ) from None
        self.accelerator.print(f"resumed from {ckpt} (step {self.state.global_step})")

    def _log(self, running: dict[str, float], phase: Phase, bar) -> None:
        n = running.pop("n", 1)
        entry = {k: v / n for k, v in running.items()}
        entry.update(
            step=self.state.global_step,
            epoch=self.state.epoch,
            explore=phase.explore,
            train_lm=phase.train_lm,
            train_policy=phase.train_policy,
            time_s=time.perf_counter() - self._started,
        )  # wall clock since train() began
        if self.lm_sched is not None:
            entry["lm_lr"] = self.lm_sched.get_last_lr()[0]
        if self.policy_sched is not None:
            entry["policy_lr"] = self.policy_sched.get_last_lr()[0]
        self.state.history.append(entry)
        bar.set_postfix({k: f"{entry[k]:.3f}" for k in ("lm_loss", "reward", "keep_ratio") if k in entry})
        self.accelerator.log(
            {f"train/{k}": v for k, v in entry.items() if isinstance(v, int | float)}, step=self.state.global_step
        )
