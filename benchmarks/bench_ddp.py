"""Both trainers under a multi-process launcher (DDP), unchanged: throughput and exactness.

Launch with ``torchrun`` (or ``accelerate launch``); the same script on 1 process gives the
reference. Every run records the per-step losses, a checksum of the final weights and the
throughput (rows per second after warm-up), so 1 and N processes can be compared at the same
global batch (exactness: CPU, gloo) or at the same per-device batch (scaling: GPUs, NCCL).

    torchrun --nproc_per_node 2 benchmarks/bench_ddp.py --trainer selective --size tiny --out r2.json
    python benchmarks/bench_ddp.py --trainer selective --size tiny --global-batch 8 --out r1.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SIZES = {
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, vocab_size=400),
    "small": dict(hidden_size=768, num_layers=12, num_heads=12, vocab_size=8192),
}


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build(size: str, seed: int):
    from forgetful.data.embedded import pretraining_documents
    from forgetful.models import build_model

    s = SIZES[size]
    docs = pretraining_documents(400, seed=0, copy_docs=40)
    return build_model(
        "tiny-llama",
        corpus=docs,
        vocab_size=s["vocab_size"],
        seed=seed,
        hidden_size=s["hidden_size"],
        num_layers=s["num_layers"],
        num_heads=s["num_heads"],
    )


def checksum(model) -> list[float]:
    """A few numbers that change with any weight: per-tensor sums of the first tensors and the total."""
    flat = [p.detach().float().cpu() for p in model.parameters()]
    return [float(sum(t.sum() for t in flat))] + [float(t.sum()) for t in flat[:4]]


def run_selective(a, rank, size) -> dict:
    from forgetful.loss.tasks import prepare_dataset_for_training
    from forgetful.loss.trainer import SelectiveLossConfig, SelectiveLossTrainer

    model, tok = build(a.size, a.seed)
    ds = prepare_dataset_for_training("tofu", tok, num_authors=a.authors, strategy="forget_facts", max_length=a.seq)
    per_device = a.global_batch // size if a.global_batch else a.per_device_batch
    losses, times, logged_train_loss = [], [], []

    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
            if logs and "train_loss" in logs:  # the figure trackers and the log history get
                logged_train_loss.append(float(logs["train_loss"]))

    cuda = torch.cuda.is_available()
    args = SelectiveLossConfig(
        output_dir=a.workdir,
        per_device_train_batch_size=per_device,
        max_steps=a.steps,
        learning_rate=1e-3,
        logging_steps=max(a.logging_steps, 1),
        logging_strategy="steps" if a.logging_steps else "no",
        loss_backend=a.loss_backend,
        report_to="none",
        save_strategy="no",
        seed=0,
        data_seed=0,
        use_cpu=not cuda,
        bf16=cuda,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_backend=("nccl" if cuda else "gloo") if size > 1 else None,
        max_grad_norm=1.0,
    )
    if a.fsdp:  # shard parameters, gradients and optimizer state (FSDP2), one unit per decoder layer
        args.fsdp, args.fsdp_config = (
            "full_shard auto_wrap",
            {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        )
    trainer = SelectiveLossTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Record()])
    result = trainer.train()
    rows = per_device * size
    warm = times[a.warmup :] or times
    return {
        "losses": losses,
        "train_loss": float(result.training_loss),
        "logged_train_loss": logged_train_loss,
        "loss_backend": trainer.loss_backend,
        "checksum": checksum(model),
        "rows_per_s": rows * len(warm) / sum(warm),
        "step_s": sum(warm) / len(warm),
        "per_device_batch": per_device,
    }


def run_reinforce(a, rank, size) -> dict:
    from forgetful.input.examples import load_forget_examples
    from forgetful.input.policies import MLPForgetMask
    from forgetful.input.reinforce import ForgetTrainingConfig, reinforce_model

    model, tok = build(a.size, a.seed)
    torch.manual_seed(1)
    policy = MLPForgetMask(model, hidden_size=32)
    per_device = a.global_batch // size if a.global_batch else a.per_device_batch
    ds = load_forget_examples(None, tok, embedded_examples=max(64, per_device * size * a.steps), seed=0)
    cfg = ForgetTrainingConfig(
        per_device_batch_size=per_device,
        num_samples=2,
        max_steps_per_epoch=a.steps,
        logging_steps=1,
        disable_tqdm=True,
        loss_backend="dense" if a.loss_backend == "auto" else a.loss_backend,
        lm_learning_rate=1e-3,
        policy_learning_rate=1e-2,
        seed=0,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
    )
    result = reinforce_model(
        model, policy, forget_p=0.5, exploration_epochs=[0.25], train_dataset=ds, tokenizer=tok, args=cfg
    )
    steps = [h for h in result.history if "lm_loss" in h]
    # every step is logged with the wall clock since training began; time the steps after warm-up
    clock = [0.0] + [h["time_s"] for h in steps]
    times = [b - a_ for a_, b in zip(clock[:-1], clock[1:])]
    warm = times[a.warmup :] or times
    return {
        "losses": [h["lm_loss"] for h in steps],
        "rewards": [h["reward"] for h in steps],
        "checksum": checksum(result.model) + checksum(result.policy),
        "per_device_batch": per_device,
        "rows_per_s": per_device * size * len(warm) / sum(warm),
        "step_s": sum(warm) / len(warm),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", choices=["selective", "reinforce"], required=True)
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--global-batch", type=int, default=0, help="rows per step over all processes (0: use --per-device-batch)"
    )
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--authors", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="selective: shard with FSDP instead of DDP")
    p.add_argument(
        "--loss-backend",
        default="auto",
        choices=["auto", "dense", "chunked", "cce", "liger"],
        help="selective: SelectiveLossConfig.loss_backend; reinforce: ForgetTrainingConfig.loss_backend (auto: dense)",
    )
    p.add_argument("--logging-steps", type=int, default=1, help="selective: log every N steps (0: never)")
    p.add_argument("--workdir", default="/tmp/bench_ddp")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if os.environ.get("FORGETFUL_HANG_DUMP"):  # print every thread's stack if a step hangs
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["FORGETFUL_HANG_DUMP"]), exit=True)
    rank, size = world()
    torch.set_num_threads(1)
    result = (run_selective if a.trainer == "selective" else run_reinforce)(a, rank, size)
    result.update(
        trainer=a.trainer,
        processes=size,
        device="cuda" if torch.cuda.is_available() else "cpu",
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        config=vars(a),
    )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if rank == 0:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("trainer", "processes", "rows_per_s", "step_s")}))


if __name__ == "__main__":
    main()
