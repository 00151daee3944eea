"""Shared benchmark setup: models of a given size, timing, environment facts, JSON output."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forgetful.measure import peak_memory_mb, run_environment, timings_ms  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SIZES = {
    # GPT-2 small: 124M parameters, the size DESIGN's ceiling is quoted for
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
    # a CPU-friendly stand-in
    "gpt2-tiny": dict(n_embd=128, n_layer=4, n_head=4, vocab_size=2048),
}

# Llama-architecture shapes (random weights: speed does not depend on them)
LLAMA_SHAPES = {
    # SmolLM2-135M-Instruct, the built-in real model (forgetful.models.gguf)
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # Llama-3.2-1B
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    # a CPU-friendly stand-in
    "llama-tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),
}
ARCHS = sorted(SIZES) + sorted(LLAMA_SHAPES)


def gpt2(size: str, positions: int, device, dtype=torch.float32, on_device: bool = False, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = {**SIZES[size], **overrides}
    cfg = GPT2Config(**shape, n_positions=positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device if on_device else "cpu"):
        model = GPT2LMHeadModel(cfg)
    return model.to(device=device, dtype=dtype)


def build_lm(arch: str, positions: int, device, dtype=torch.float32, on_device: bool = False, **overrides):
    """A randomly initialised causal LM of a named shape (GPT-2 or Llama family), SDPA attention.
    ``on_device``: initialise the weights on ``device`` (seconds instead of a minute for 1B
    parameters; other random values than a CPU initialisation); ``overrides``: config fields."""
    if arch in SIZES:
        return gpt2(arch, positions, device, dtype, on_device, **overrides)
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**LLAMA_SHAPES[arch], **overrides}
    cfg = LlamaConfig(**shape, max_position_embeddings=max(positions, 2048), attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device if on_device else "cpu"):
        model = LlamaForCausalLM(cfg)
    return model.to(device=device, dtype=dtype)


def compile_lm(model, how: str):
    """``full``: torch.compile the whole model; ``regional``: each decoder layer (the layers share one
    compiled graph, so compilation takes seconds instead of minutes); the model runs as returned."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 64
    if how == "full":
        return torch.compile(model)
    if how == "regional":
        inner = getattr(model, "model", None) or getattr(model, "transformer", None)
        for layer in getattr(inner, "layers", None) or inner.h:
            layer.compile()
        return model
    raise ValueError(f"unknown compile mode {how!r}")


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def environment(device: torch.device) -> dict:
    """The library's record of where a result was measured (versions, GPU, git commit, command)."""
    return run_environment(device)


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
