"""Both trainers under a multi-process launcher (DDP, and FSDP2 for the Trainer), unchanged:
throughput and exactness.

Launch with ``torchrun`` (or ``accelerate launch``); the same script on 1 process gives the
reference. Every run records the per-step losses, a checksum of the final weights and the
throughput (rows and tokens per second after warm-up steps), so 1 and N processes can be compared at
the same global batch (exactness: CPU, gloo) or at the same per-device batch (scaling: GPUs, NCCL).

    torchrun --nproc_per_node 2 benchmarks/bench_ddp.py --trainer selective --size tiny --out r2.json
    python benchmarks/bench_ddp.py --trainer selective --size tiny --global-batch 8 --out r1.json

On GPUs with the real model (``--size smollm2``: SmolLM2-135M-Instruct; ``--text FILE``: WikiText-2
blocks for the Trainer and windows for REINFORCE instead of the embedded data), ``--reps 3`` repeats
the measured run three times in one launch after a warm-up run (each from the same initial weights),
and ``--profile`` adds the top device operators of one step (the all-reduce included) to the JSON.
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
    from forgetful.models import build_model, load_model

    if size == "smollm2":  # the real model: float32 master weights, bf16 autocast on the GPU
        return load_model("smollm2-135m", dtype=torch.float32)
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


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_step(step, cuda: bool) -> list[dict]:
    """The top operators of one call of ``step()`` by device time (CPU time without a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        _sync()
    key = "device_time_total" if cuda else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:15]
    return [{"op": e.key, "calls": e.count, "ms": getattr(e, key, 0) / 1000} for e in events]


def run_selective(a, model, tok, size) -> dict:
    from transformers import TrainerCallback

    from forgetful.loss.tasks import prepare_dataset_for_training
    from forgetful.loss.trainer import SelectiveLossConfig, SelectiveLossTrainer

    if a.text:
        ds = prepare_dataset_for_training("text", tok, source=a.text, block_size=a.seq, max_rows=a.max_rows)
    else:
        ds = prepare_dataset_for_training("tofu", tok, num_authors=a.authors, strategy="forget_facts", max_length=a.seq)
    per_device = a.global_batch // size if a.global_batch else a.per_device_batch
    losses, times, tokens, profiles, logged_train_loss = [], [], [], [], []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync()
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
        gradient_accumulation_steps=a.accumulation,
        max_steps=a.steps,
        learning_rate=1e-3 if a.size == "tiny" else 1e-5,
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
    counted = trainer.training_step

    def training_step(model_, inputs, *rest, **kw):
        tokens.append(int(inputs["attention_mask"].sum()))
        # the last micro-batch of the first step after warm-up: the one whose backward all-reduces
        if a.profile and len(tokens) == (a.warmup + 1) * a.accumulation and not profiles:
            out = []
            profiles.append(profile_step(lambda: out.append(counted(model_, inputs, *rest, **kw)), cuda))
            return out[0]
        return counted(model_, inputs, *rest, **kw)

    trainer.training_step = training_step
    result = trainer.train()
    per_step_tokens = [sum(tokens[i : i + a.accumulation]) for i in range(0, len(tokens), a.accumulation)]
    out = _throughput(
        a,
        size,
        per_device * a.accumulation,
        losses,
        times,
        per_step_tokens,
        checksum(model),
        profiles[0] if profiles else None,
    )
    out.update(
        train_loss=float(result.training_loss), logged_train_loss=logged_train_loss, loss_backend=trainer.loss_backend
    )
    return out


def run_reinforce(a, model, tok, size) -> dict:
    from forgetful.input.examples import load_forget_examples
    from forgetful.input.policies import MLPForgetMask
    from forgetful.input.reinforce import ForgetTrainingConfig, reinforce_model

    torch.manual_seed(1)
    policy = MLPForgetMask(model, hidden_size=32 if a.size == "tiny" else 128)
    per_device = a.global_batch // size if a.global_batch else a.per_device_batch
    rows = per_device * size * a.accumulation * a.steps
    if a.text:
        # overlapping windows (stride 256): enough rows for every step of two processes
        ds = load_forget_examples(
            a.text, tok, context_length=a.seq, target_length=32, stride=256, max_examples=max(rows, 64)
        )
    else:
        ds = load_forget_examples(None, tok, embedded_examples=max(64, rows), seed=0)
    cfg = ForgetTrainingConfig(
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=a.accumulation,
        num_samples=a.samples,
        max_steps_per_epoch=a.steps,
        logging_steps=1,
        disable_tqdm=True,
        loss_backend="dense" if a.loss_backend == "auto" else a.loss_backend,
        learning_rate=1e-3 if a.size == "tiny" else 1e-5,
        policy_learning_rate=1e-2,
        seed=0,
        bf16=torch.cuda.is_available(),
    )
    result = reinforce_model(
        model, policy, forget_p=0.5, exploration_epochs=[0.25], train_dataset=ds, tokenizer=tok, args=cfg
    )
    steps = [h for h in result.history if "lm_loss" in h]
    # every step is logged with the wall clock since training began; time the steps after warm-up
    clock = [0.0] + [h["time_s"] for h in steps]
    times = [b - a_ for a_, b in zip(clock[:-1], clock[1:])]
    lengths = [len(c) + len(t) for c, t in zip(ds["context_ids"][:rows], ds["target_ids"][:rows])]
    step_rows = per_device * size * a.accumulation
    # tokens the LM reads per step, over all processes: K samples of each row at its kept length
    per_step_tokens = [a.samples * sum(lengths[i : i + step_rows]) // size for i in range(0, len(lengths), step_rows)]
    out = _throughput(
        a,
        size,
        per_device * a.accumulation,
        [h["lm_loss"] for h in steps],
        times,
        per_step_tokens,
        checksum(result.model) + checksum(result.policy),
        None,
    )
    out["rewards"] = [h["reward"] for h in steps]
    return out


def _throughput(a, size, rows_per_device_step, losses, times, per_step_tokens, check, profile) -> dict:
    warm = times[a.warmup :] or times
    tokens = per_step_tokens[a.warmup : a.warmup + len(warm)] or per_step_tokens
    return {
        "losses": losses,
        "checksum": check,
        "per_device_batch": rows_per_device_step // a.accumulation,
        "rows_per_s": rows_per_device_step * size * len(warm) / sum(warm),
        "tokens_per_s": sum(tokens) * size / sum(warm) if tokens else None,
        "step_s": sum(warm) / len(warm),
        "step_times_s": times,
        "profile": profile,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", choices=["selective", "reinforce"], required=True)
    p.add_argument("--size", choices=[*SIZES, "smollm2"], default="tiny")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the throughput")
    p.add_argument(
        "--global-batch", type=int, default=0, help="rows per step over all processes (0: use --per-device-batch)"
    )
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--samples", type=int, default=2, help="reinforce: keep sets per context")
    p.add_argument("--seq", type=int, default=128, help="selective: block / row length; reinforce with --text: context")
    p.add_argument("--text", default=None, help="a text file (WikiText-2) instead of the embedded data")
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--authors", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="selective: shard with FSDP instead of DDP")
    p.add_argument("--reps", type=int, default=1, help="measured repetitions after a warm-up run (when > 1)")
    p.add_argument("--profile", action="store_true", help="selective: the top device operators of one step")
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
    runs = []
    total = a.reps + 1 if a.reps > 1 else 1
    for i in range(total):  # with several repetitions, the first is a warm-up
        # a fresh model each time: the same initial weights, and no wrapper (DDP, FSDP) left on it
        model, tok = build(a.size, a.seed)
        run = run_selective if a.trainer == "selective" else run_reinforce
        # profiling slows the step it watches: do it in the warm-up run, which is not measured
        this = argparse.Namespace(**{**vars(a), "profile": a.profile and i == 0})
        runs.append(run(this, model, tok, size))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result = dict(runs[-1], profile=runs[0].get("profile"))
    if a.reps > 1:
        result["repetitions"] = [
            {k: r[k] for k in ("rows_per_s", "tokens_per_s", "step_s", "losses")} for r in runs[1:]
        ]
        result["warmup_run"] = {k: runs[0][k] for k in ("rows_per_s", "tokens_per_s", "step_s")}
    result.update(
        trainer=a.trainer + ("-fsdp" if a.fsdp else ""),
        processes=size,
        device="cuda" if torch.cuda.is_available() else "cpu",
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        config=vars(a),
    )
    from forgetful.training.distributed import close_process_group

    close_process_group()
    if rank == 0:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("trainer", "processes", "rows_per_s", "tokens_per_s", "step_s")}))


if __name__ == "__main__":
    main()
