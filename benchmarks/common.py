"""Shared benchmark setup: models of a given size, timing, environment facts, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forgetful.measure import peak_memory_mb, timings_ms  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SIZES = {
    # GPT-2 small: 124M parameters, the size DESIGN's ceiling is quoted for
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
    # a CPU-friendly stand-in
    "gpt2-tiny": dict(n_embd=128, n_layer=4, n_head=4, vocab_size=2048),
}


def gpt2(size: str, positions: int, device, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**SIZES[size], n_positions=positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(device=device, dtype=dtype)


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def cuda_time_ms(fn, warmup: int = 3, repeats: int = 10) -> tuple[float, list[float]]:
    """Median milliseconds of fn() and every repeat (the library's timer: CUDA events on a GPU)."""
    times = timings_ms(fn, DEVICE, warmup=warmup, repeats=repeats)
    return statistics.median(times), times


def peak_mb(fn) -> float | None:
    """Peak memory of fn() above what was allocated before (CUDA; None on the CPU)."""
    return peak_memory_mb(fn, DEVICE)[0] if DEVICE.type == "cuda" else None


def write(results: dict, out: str | os.PathLike) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
