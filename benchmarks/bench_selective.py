"""SelectiveLossTrainer against a plain ``transformers.Trainer`` given ``labels = -100`` for the same masks.

At trained-token densities 100%, 50% and 10%, runs both trainers for the same steps on the same
rows and records each optimizer step's wall time (CUDA synchronised) and peak memory: the whole
process peak, and the peak above what was allocated when the step began (activations, logits and
gradients; weights and optimizer state excluded).

    python benchmarks/bench_selective.py --size gpt2-small --seq 1024 --batch 16 --out results.json
    python benchmarks/bench_selective.py --size gpt2-tiny --seq 256 --batch 8 --steps 6     # CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import environment, gpt2, write
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from forgetful.loss.trainer import SelectiveLossConfig, SelectiveLossTrainer


class StepMeter(TrainerCallback):
    def __init__(self):
        self.times, self.step_peaks, self.total_peaks = [], [], []
        self._t = self._base = 0.0

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.step_peaks.append((peak - self._base) / 2**20)
            self.total_peaks.append(peak / 2**20)
        self.times.append((time.perf_counter() - self._t) * 1e3)


def rows(n_rows: int, seq: int, vocab: int, density: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_rows, seq), generator=g)
    mask = (torch.rand(n_rows, seq, generator=g) < density).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, 0] = -100
    return {"input_ids": ids.tolist(), "loss_mask": mask.tolist(), "labels": labels.tolist()}


def plain_collate(batch):
    return {
        "input_ids": torch.tensor([r["input_ids"] for r in batch]),
        "labels": torch.tensor([r["labels"] for r in batch]),
    }


def run(kind: str, size: str, data: dict, a, device) -> StepMeter:
    model = gpt2(size, a.seq, device)
    meter = StepMeter()
    common = dict(
        output_dir=f"/tmp/bench_selective_{kind}",
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        learning_rate=1e-4,
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
    )
    if kind == "selective":
        ds = Dataset.from_dict({"input_ids": data["input_ids"], "loss_mask": data["loss_mask"]})
        trainer = SelectiveLossTrainer(
            model=model, args=SelectiveLossConfig(**common), train_dataset=ds, callbacks=[meter]
        )
        trainer.data_collator.pad_token_id = 0
    else:
        ds = Dataset.from_dict({"input_ids": data["input_ids"], "labels": data["labels"]})
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common, remove_unused_columns=False),
            train_dataset=ds,
            data_collator=plain_collate,
            callbacks=[meter],
        )
    trainer.train()
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return meter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2-small")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--densities", default="1.0,0.5,0.1")
    p.add_argument("--out", default="bench_selective.json")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from common import SIZES

    vocab = SIZES[a.size]["vocab_size"]
    results = {"env": environment(device), "config": vars(a), "rows": []}
    for density in (float(x) for x in a.densities.split(",")):
        data = rows(a.batch * a.steps, a.seq, vocab, density)
        row = {"density": density}
        for kind in ("plain", "selective"):
            m = run(kind, a.size, data, a, device)
            row[f"{kind}_step_ms"] = statistics.median(m.times[a.warmup :])
            if m.step_peaks:
                row[f"{kind}_step_peak_mb"] = max(m.step_peaks)
                row[f"{kind}_total_peak_mb"] = max(m.total_peaks)
        row["time_ratio"] = row["selective_step_ms"] / row["plain_step_ms"]
        if "plain_step_peak_mb" in row:
            row["step_mem_ratio"] = row["selective_step_peak_mb"] / row["plain_step_peak_mb"]
            row["total_mem_ratio"] = row["selective_total_peak_mb"] / row["plain_total_peak_mb"]
        results["rows"].append(row)
        print(
            f"density {density:.0%}: step {row['selective_step_ms']:.1f} vs {row['plain_step_ms']:.1f} ms "
            f"({row['time_ratio']:.3f}x); step memory {row.get('step_mem_ratio', float('nan')):.3f}x, "
            f"process peak {row.get('total_mem_ratio', float('nan')):.3f}x",
            flush=True,
        )
    write(results, a.out)


if __name__ == "__main__":
    main()
