"""Shared benchmark setup: models of a given size, timing in interleaved rounds, environment facts,
JSON results rewritten atomically after every row, and a wall-clock guard."""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forgetful.atomic import write_text_atomic  # noqa: E402
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

# The compute-bound setting of bench_forgetting and bench_masks on SmolLM2's architecture (why: the
# docstring of bench_forgetting.py): context n, target m, batch B.
COMPUTE_BOUND = {"arch": "smollm2", "n": 4096, "target": 32, "batch": 16}


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


def peak_mb(fn) -> float | None:
    """Peak memory of fn() above what was allocated before (CUDA; None on the CPU)."""
    return peak_memory_mb(fn, DEVICE)[0] if DEVICE.type == "cuda" else None


def write(results: dict, out: str | os.PathLike) -> None:
    """``results`` as JSON at ``out``, replaced atomically (a reader never sees half a file)."""
    write_text_atomic(json.dumps(results, indent=2) + "\n", out)
    print(f"wrote {out}", flush=True)


class ResultsFile:
    """A benchmark's JSON (``env``, ``config``, ``rows``, ...), rewritten atomically after every change,
    so that a run stopped at any point (its time limit, the device call's) leaves all it measured.
    ``complete``: the script reached its end (False: it was killed or failed on the way); ``stopped``:
    why it ended early, by its own time limit."""

    def __init__(self, out: str | os.PathLike, env: dict, config: dict):
        self.out = Path(out)
        self.data: dict = {"env": env, "config": config, "complete": False, "rows": []}
        self.start = time.perf_counter()
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        write_text_atomic(json.dumps(self.data, indent=2) + "\n", self.out)

    def put(self, row: dict, key: tuple[str, ...]) -> dict:
        """Add ``row``, or replace the row with the same values of the ``key`` fields; then save."""
        rows = self.data["rows"]
        ident = tuple(row.get(k) for k in key)
        for i, old in enumerate(rows):
            if tuple(old.get(k) for k in key) == ident:
                rows[i] = row
                break
        else:
            rows.append(row)
        self.save()
        return row

    def set(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def finish(self, **fields) -> None:
        self.data.update(fields, complete=True)
        self.save()
        print(f"wrote {self.out} ({len(self.data['rows'])} rows, {self.data['elapsed_s']:.0f} s)", flush=True)


class Deadline:
    """A wall-clock guard: :meth:`allows` says whether work expected to take ``seconds`` still fits
    before ``limit`` seconds from now have passed (``None``: no limit)."""

    def __init__(self, limit: float | None):
        self.limit = limit
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, seconds: float = 0.0) -> bool:
        return self.limit is None or self.elapsed() + seconds <= self.limit

    def reason(self, what: str) -> str:
        return f"time limit {self.limit:.0f} s: stopped at {self.elapsed():.0f} s before {what}"


def timed_rounds(
    work: dict[Hashable, Callable[[], object]],
    device,
    rounds: int,
    repeats: int,
    deadline: Deadline | None = None,
    after_round: Callable[[dict[Hashable, list[float]], int], None] | None = None,
) -> tuple[dict[Hashable, list[float]], str | None]:
    """Every function of ``work`` timed in ``rounds`` interleaved rounds (a shuffled order each
    round; each entry the median of ``repeats`` event-timed runs after one warm-up run). Returns
    the per-round medians of each key and, when the deadline stopped the rounds early, why.
    ``after_round(medians, done)`` is called after each round (to save partial results); a round is
    started only when the deadline allows the longest round so far (the first: when it has not
    passed)."""
    order = list(work)
    medians: dict[Hashable, list[float]] = {key: [] for key in order}
    longest = 0.0
    for r in range(rounds):
        if deadline is not None and not deadline.allows(longest):
            return medians, deadline.reason(f"round {r + 1} of {rounds}")
        t0 = time.perf_counter()
        random.Random(r).shuffle(order)
        for key in order:
            medians[key].append(statistics.median(timings_ms(work[key], device, warmup=1, repeats=repeats)))
        longest = max(longest, time.perf_counter() - t0)
        if after_round is not None:
            after_round(medians, r + 1)
    return medians, None
