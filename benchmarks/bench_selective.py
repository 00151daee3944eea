"""Selective loss against the fused cross-entropy kernels, at every loss-mask density, on real weights.

One forward + backward of the whole model (bf16 autocast on CUDA, float32 weights) per method, at
densities 1.0 / 0.5 / 0.1 (random loss masks, the same for every method), on each ``--models``
entry ``NAME:BATCHxSEQ`` (``LABEL=NAME:...`` names its rows LABEL). NAME is a shape of
``common.py`` (random weights, initialised on the GPU) or anything ``forgetful.models.load_model``
loads (the built-in ``smollm2-135m``, a ``.gguf`` file, a folder), in float32. The default: the real
SmolLM2-135M-Instruct (batch 16 x 2048) and the Llama-3.2-1B shape (batch 4 x 2048, random weights).

* ``hf_plain``: the model's own loss given ``labels`` (full ``[B, L, vocab]`` logits).
* ``liger_all``: Liger's fused linear cross-entropy over every position (``ignore_index=-100``),
  what a Trainer user gets from ``--use_liger_kernel``: the functional on the final hidden states.
* ``cce_all``: Cut Cross-Entropy over every position (``shift=True``), its defaults (gradient
  filtering ``filter_eps="high"``), on the final hidden states cast to bf16 (PyPI 25.1.1).
* ``cce_gathered``: CCE with its defaults on the hidden states of the trained positions only (what
  a user gets by gathering them before calling it).
* ``forgetful_<backend>``: :func:`forgetful.nll.token_nll` with ``loss_backend`` dense, chunked,
  cce (``filter_eps=None``), liger and auto and ``summed=True``, summed over the global count, as
  ``SelectiveLossTrainer.compute_loss`` does (chunked and liger then compute the head's gradients
  in the forward: three head matmuls, not four).

A peer runs only when its package imports (else ``skipped`` with the reason; GPU-only methods on
the CPU too); a method that fails (out of memory) gets an ``error`` and the run goes on.

**Exactness** (``grad_cosine``): the gradients of the loss **with respect to the final hidden
states** (``[B, L, d]``, zero where nothing is trained) **and the LM head weight** (``[V, d]``; only
the head's own contribution), each method given the same hidden states (one autocast forward of the
model, then fixed), against the fp32 dense reference on those hidden states: ``F.linear`` in
float32 (TF32 off), ``F.cross_entropy`` in float32, no autocast. ``grad_cosine`` is the smaller of
the two cosines (``grad_cosine_hidden``, ``grad_cosine_head``; ``forgetful.measure.gradient_cosine``);
``loss_rel_diff`` compares the losses. ``forgetful_dense`` under bf16 autocast shows what bf16
matmuls alone cost; on the CPU (float32) it is the reference's own computation (1.0).

Each row: the time (``ms``: median over ``--rounds`` round medians, each the median of ``--repeats``
CUDA-event-timed steps after one warm-up, the methods in a shuffled order each round;
``ms_spread``: min / median / max), the step's peak memory (``torch.cuda.max_memory_allocated``:
``peak_gib`` absolute, weights included; ``step_peak_gib`` above the weights; measured after the
gradient checks, their reference freed and their hidden states on the host), and the time and
memory against ``forgetful_dense``, ``liger_all``, ``cce_all`` and the better of the last two
(``*_vs_best_fused``). The JSON is rewritten atomically after every row and every round; past
``--time-limit`` seconds no new model, density, method or round starts (``stopped`` says where).

    python benchmarks/bench_selective.py --out selective_backends.json      # GPU, both models, < 8 min
    python benchmarks/bench_selective.py --models llama-tiny:2x32,smollm2-135m:2x32 --rounds 1 --repeats 1 --out x.json
    python benchmarks/bench_selective.py --cpu-memory --out benchmarks/results/selective_chunked_cpu.json

``--cpu-memory``: peak live-tensor memory of one forward + backward on the CPU (float32,
``forgetful.measure.peak_memory_mb``), ``chunked`` against ``dense`` at density 1.0 with a 32k
vocabulary (a Llama-shaped toy model): the chunked backend never holds ``[N, vocab]`` logits.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import traceback

import torch
from common import ARCHS, Deadline, ResultsFile, build_lm, environment, spread, timed_rounds, write
from selective_methods import (
    FUSED_PEERS,
    METHODS,
    Bench,
    agreement,
    autocast,
    first_line,
    kernel_versions,
    random_labels,
)

from forgetful.measure import peak_memory_mb, timings_ms
from forgetful.nll_kernels import CHUNK_ELEMENTS, chunk_rows

DEFAULT_MODELS = "smollm2-135m:16x2048,llama-1b:4x2048"
ROW_KEY = ("model", "density", "method")
GIB = 2**30


def parse_models(text: str) -> list[tuple[str, str, int, int]]:
    """``[LABEL=]NAME:BATCHxSEQ, ...`` -> (label, name, batch, seq)."""
    out = []
    for item in text.split(","):
        spec, _, shape = item.strip().rpartition(":")
        label, _, name = spec.rpartition("=")
        batch, _, seq = shape.partition("x")
        out.append((label or name, name, int(batch), int(seq)))
    return out


def load(name: str, seq: int, device) -> tuple[torch.nn.Module, str]:
    """A shape of common.py (random weights) or a real model (``load_model``), float32, on ``device``."""
    if name in ARCHS:
        return build_lm(name, seq, device, on_device=device.type == "cuda"), "random"
    from forgetful.models import load_model

    model, _ = load_model(name, dtype=torch.float32)
    return model.to(device), "real"


def measure_peak(step, device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_gib": peak / GIB, "step_peak_gib": (peak - base) / GIB, "memory_kind": "cuda_max_allocated"}
    mb, kind = peak_memory_mb(step, device)
    return {"peak_gib": mb / 1024, "step_peak_gib": mb / 1024, "memory_kind": kind}


def cleanup(model, device) -> None:
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench_model(label: str, name: str, batch: int, seq: int, a, device, results: ResultsFile, deadline) -> None:
    t0 = time.perf_counter()
    model, weights = load(name, seq, device)
    model.train()
    vocab = model.config.vocab_size
    dtype = torch.bfloat16 if device.type == "cuda" else None
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    with torch.no_grad(), autocast(device, dtype):
        # fixed for the gradient checks; kept on the host, out of every step's peak memory
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state.cpu()
    print(f"{label} ({weights} weights) {batch}x{seq}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    for d_i, density in enumerate(a.densities):
        if not deadline.allows():
            results.set(stopped=deadline.reason(f"{label} density {density}"))
            return
        bench = Bench(model, ids, random_labels(ids, density, a.seed + 1 + d_i), device, dtype)
        rows, steps = {}, {}
        base = dict(model=label, weights=weights, batch=batch, seq=seq, vocab=vocab, density=density)
        ref = bench.head_gradients(None, hidden)
        for method in a.methods:  # the gradient checks, while the reference is alive
            if not deadline.allows():
                results.set(stopped=deadline.reason(f"{label} density {density} {method}"))
                break
            row = rows[method] = {**base, "method": method, "scored_tokens": bench.count}
            reason = bench.unavailable(method)
            if reason:
                row["skipped"] = reason
            else:
                if method == "forgetful_auto":
                    row["auto_resolves_to"] = bench.auto_choice()
                try:
                    row.update(agreement(bench.head_gradients(method, hidden), ref))
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    row["error"] = first_line(exc)
                    if a.verbose:
                        traceback.print_exc()
            cleanup(model, device)
            results.put(row, ROW_KEY)
        del ref
        cleanup(model, device)
        for method, row in rows.items():  # warm-up and peak memory of each whole step
            if "skipped" in row or "error" in row:
                continue
            if not deadline.allows():
                results.set(stopped=deadline.reason(f"the warm-up of {label} density {density} {method}"))
                break
            try:
                step = bench.step_fn(method)
                step()  # kernel compilation and autotuning
                cleanup(model, device)  # the warm-up's gradients freed: the peak counts the step's own
                row.update(measure_peak(step, device))
                steps[method] = step
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                row["error"] = first_line(exc)
                if a.verbose:
                    traceback.print_exc()
            cleanup(model, device)
            results.put(row, ROW_KEY)
        if results.data.get("stopped"):
            return

        def put_times(medians: dict, done: int, rows: dict = rows) -> None:
            for method, ms in medians.items():
                if ms:
                    rows[method].update(ms=statistics.median(ms), ms_spread=spread(ms), rounds_done=done)
                    results.put(rows[method], ROW_KEY)
            add_ratios(results.data["rows"])
            results.save()

        _, stopped = timed_rounds(steps, device, a.rounds, a.repeats, deadline, after_round=put_times)
        print_rows(list(rows.values()))
        if stopped or results.data.get("stopped"):
            results.set(stopped=stopped or results.data["stopped"])
            return
        cleanup(model, device)
    del model, hidden
    cleanup_all(device)


def cleanup_all(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_ratios(rows: list[dict]) -> None:
    """Each row's time and memory against forgetful_dense, liger_all, cce_all and the better of the
    last two (``best_fused``) of the same model and density."""
    by_key = {(r["model"], r["density"], r["method"]): r for r in rows}
    for r in rows:
        for ref in ("forgetful_dense", *FUSED_PEERS):
            other = by_key.get((r["model"], r["density"], ref))
            if other is None or other is r:
                continue
            for field in ("ms", "peak_gib"):
                if field in r and field in other:
                    r[f"{field}_vs_{ref}"] = r[field] / other[field]
        for field in ("ms", "peak_gib"):
            peers = [by_key.get((r["model"], r["density"], p), {}).get(field) for p in FUSED_PEERS]
            peers = [x for x in peers if x is not None]
            if field in r and peers and r["method"] not in FUSED_PEERS:
                r[f"{field}_vs_best_fused"] = r[field] / min(peers)


def fmt(x, spec: str) -> str:
    """``x`` formatted by ``spec``; a missing value as "-" of the same width."""
    if isinstance(x, int | float) and math.isfinite(x):
        return format(x, spec)
    width = spec.split(".")[0]
    return "-".rjust(int(width) if width.isdigit() else 1)


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        status = r.get("error") or r.get("skipped") or ""
        print(
            f"  {r['model']:<13} {r['density']:>4} {r['method']:<18} {fmt(r.get('ms'), '9.2f')} ms "
            f"{fmt(r.get('peak_gib'), '7.3f')} GiB  loss {fmt(r.get('loss'), '.5f')} "
            f"cos {fmt(r.get('grad_cosine'), '.6f')}  {status[:90]}",
            flush=True,
        )


def table(rows: list[dict]) -> str:
    lines = [
        f"{'model':<13} {'dens':>4} {'method':<18} {'ms':>9} {'min-max':>15} {'peak GiB':>8} {'vs dense':>8} "
        f"{'vs best fused':>13} {'mem vs best':>11} {'grad cos':>9}  status"
    ]
    for r in rows:
        sp = r.get("ms_spread") or {"min": None, "max": None}
        status = (r.get("error") or r.get("skipped") or "ok")[:60]
        lines.append(
            f"{r['model']:<13} {r['density']:>4} {r['method']:<18} {fmt(r.get('ms'), '9.2f')} "
            f"{fmt(sp.get('min'), '7.2f')}-{fmt(sp.get('max'), '7.2f')} {fmt(r.get('peak_gib'), '8.3f')} "
            f"{fmt(r.get('ms_vs_forgetful_dense'), '8.3f')} {fmt(r.get('ms_vs_best_fused'), '13.3f')} "
            f"{fmt(r.get('peak_gib_vs_best_fused'), '11.3f')} {fmt(r.get('grad_cosine'), '9.6f')}  {status}"
        )
    return "\n".join(lines)


def cpu_memory(a) -> dict:
    """Peak live-tensor memory (CPU, float32) of one forward + backward: chunked vs dense."""
    device = torch.device("cpu")
    model = build_lm(a.cpu_arch, a.cpu_seq, device, vocab_size=a.vocab)
    model.train()
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, a.vocab, (a.cpu_batch, a.cpu_seq), generator=g)
    bench = Bench(model, ids, random_labels(ids, 1.0, a.seed + 1), device, None)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    ref = bench.head_gradients(None, hidden)
    rows = []
    for method in ("forgetful_dense", "forgetful_chunked"):
        step = bench.step_fn(method)
        step()  # warm-up
        model.zero_grad(set_to_none=True)
        mb, kind = peak_memory_mb(step, device)
        model.zero_grad(set_to_none=True)
        ms = timings_ms(step, device, warmup=0, repeats=a.repeats)
        row = {"method": method, "peak_mb": mb, "memory_kind": kind, "ms": statistics.median(ms), "ms_all": ms}
        row.update(agreement(bench.head_gradients(method, hidden), ref))
        rows.append(row)
        print(f"{method}: peak {mb:.1f} MB ({kind}), {row['ms']:.0f} ms, loss {row['loss']:.6f}", flush=True)
    ratio = rows[1]["peak_mb"] / rows[0]["peak_mb"]
    n = bench.count
    print(f"chunked / dense peak memory: {ratio:.3f} (goal <= 0.6)")
    return {
        "rows": rows,
        "chunked_over_dense_peak": ratio,
        "scored_tokens": n,
        "logits_mb_dense": n * a.vocab * 4 / 2**20,
        "chunk_rows": chunk_rows(a.vocab),
        "chunk_elements": CHUNK_ELEMENTS,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="[LABEL=]NAME:BATCHxSEQ, comma separated")
    p.add_argument("--densities", default="1.0,0.5,0.1")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3, help="timed steps per round (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the methods in a shuffled order each")
    p.add_argument("--time-limit", type=float, default=420.0, help="seconds (0: none); what was measured is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failing method")
    p.add_argument("--cpu-memory", action="store_true", help="the CPU memory measurement (chunked vs dense) only")
    p.add_argument("--vocab", type=int, default=32000, help="--cpu-memory: vocabulary size")
    p.add_argument("--cpu-arch", default="llama-tiny", help="--cpu-memory: model shape (common.py)")
    p.add_argument("--cpu-batch", type=int, default=8)
    p.add_argument("--cpu-seq", type=int, default=256)
    p.add_argument("--out", default="selective_backends.json")
    a = p.parse_args()
    a.densities = [float(x) for x in a.densities.split(",")]
    a.methods = [m.strip() for m in a.methods.split(",")]
    unknown = sorted(set(a.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is float32, not TF32
    if a.cpu_memory:
        torch.manual_seed(a.seed)
        out = cpu_memory(a)
        keys = ("vocab", "cpu_arch", "cpu_batch", "cpu_seq", "repeats", "seed")
        config = {"density": 1.0, **{k: getattr(a, k) for k in keys}}
        write({"env": environment(torch.device("cpu")), "config": config, **out}, a.out)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = {
        **vars(a),
        "chunk_elements": CHUNK_ELEMENTS,
        "filter_eps": {
            "cce_all": "high (CCE's default)",
            "cce_gathered": "high (CCE's default)",
            "forgetful_cce": None,
        },
        "grad_reference": "fp32 dense on the same final hidden states (F.linear float32, TF32 off, F.cross_entropy)",
        "grad_cosine_of": ["final hidden states [B, L, d]", "LM head weight [V, d] (the head's contribution)"],
    }
    results = ResultsFile(a.out, {**environment(device), "kernels": kernel_versions()}, config)
    deadline = Deadline(a.time_limit or None)
    for label, name, batch, seq in parse_models(a.models):
        if not deadline.allows():
            results.set(stopped=deadline.reason(f"model {label}"))
        if results.data.get("stopped"):
            break
        try:
            bench_model(label, name, batch, seq, a, device, results, deadline)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built or run: recorded
            results.data.setdefault("model_errors", {})[f"{label}:{batch}x{seq}"] = first_line(exc)
            results.save()
            print(f"{label}: {first_line(exc)}", flush=True)
            if a.verbose:
                traceback.print_exc()
            cleanup_all(device)
    add_ratios(results.data["rows"])
    results.finish()
    print(table(results.data["rows"]))
    if results.data.get("stopped"):
        print(results.data["stopped"])


if __name__ == "__main__":
    main()
