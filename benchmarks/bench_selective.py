"""Selective loss against the fused cross-entropy kernels, at every loss-mask density.

One forward + backward of the whole model (bf16 autocast on CUDA, float32 weights) per method, at
densities 1.0 / 0.5 / 0.1 (random loss masks, the same for every method), on a GPT-2-small model
(batch 16 x 1024) and a Llama-3.2-1B-shaped model (batch 4 x 2048, random weights):

* ``hf_plain``: the model's own loss given ``labels`` (full ``[B, L, vocab]`` logits).
* ``liger_all``: Liger's fused linear cross-entropy over every position (``ignore_index=-100``),
  what a Trainer user gets from ``--use_liger_kernel``: the functional on the final hidden states.
* ``cce_all``: Cut Cross-Entropy over every position (``shift=True``, ``ignore_index=-100``, its
  default gradient filtering), on the final hidden states cast to bf16 (PyPI 25.1.1 has no
  autocast and no float32 backward).
* ``forgetful_<backend>``: :func:`forgetful.nll.token_nll` with ``loss_backend`` dense, chunked,
  cce, liger and auto (the hidden states of trained positions only), summed over the global count,
  as ``SelectiveLossTrainer.compute_loss`` does.

Each row has the time (median of CUDA-event-timed repeats, ``forgetful.measure.timings_ms``, in
``--rounds`` rounds that go round-robin over the methods; ``ms_spread`` = min / median / max of
the round medians), the step's peak memory (``torch.cuda.max_memory_allocated``: ``peak_gib``
absolute, weights included; ``step_peak_gib`` above the weights at the step's start, gradients
included) and the agreement with ``forgetful_dense`` (relative loss difference; cosine and
relative error of the gradients of the LM head's first ``--check-rows`` rows, the first layer's
first weight and the final norm). A method that fails (not installed, out of memory) gets an
``error`` and the run goes on; GPU-only methods on the CPU get ``skipped`` with the reason.

    python benchmarks/bench_selective.py --out bench_selective.json          # GPU, both models
    python benchmarks/bench_selective.py --models gpt2-tiny:2x32 --rounds 1 --repeats 1 --out x.json   # CPU
    python benchmarks/bench_selective.py --cpu-memory --out benchmarks/results/selective_chunked_cpu.json

Runtime on one H200 (estimate, not measured): GPT-2-small steps take about 40-80 ms and
Llama-1B-shaped steps 120-250 ms; 8 methods x 3 densities x (1 check + 1 memory + rounds x
(warmup + repeats) = 1 + 1 + 3 x 6) steps is about 480 steps per model: ~25 s + ~80 s, plus model
initialisation on the GPU, Triton / torch.compile warm-up of the kernels (~10-20 s) and the
gradient copies for the checks: about 2.5-3 minutes with the defaults.

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
import torch.nn.functional as F
from common import build_lm, environment, spread, write

from forgetful.errors import ForgetfulError
from forgetful.measure import peak_memory_mb, timings_ms
from forgetful.nll import token_nll
from forgetful.nll_backends import CHUNK_ELEMENTS, check_loss_backend, chunk_rows, kernel_available

METHODS = (
    "hf_plain",
    "liger_all",
    "cce_all",
    "forgetful_dense",
    "forgetful_chunked",
    "forgetful_cce",
    "forgetful_liger",
    "forgetful_auto",
)
DEFAULT_MODELS = "gpt2-small:16x1024,llama-1b:4x2048"
GIB = 2**30


def parse_models(text: str) -> list[tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        arch, _, shape = item.strip().partition(":")
        batch, _, seq = shape.partition("x")
        out.append((arch, int(batch), int(seq)))
    return out


def random_labels(ids: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """Labels as the collator folds them: the token where the (random) loss mask is 1, -100 elsewhere
    and at position 0."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(ids.shape, generator=g) < density
    labels = torch.where(mask, ids.cpu(), torch.full_like(ids.cpu(), -100))
    labels[:, 0] = -100
    return labels.to(ids.device)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class Bench:
    def __init__(self, model, ids, labels, device, autocast_dtype):
        self.model, self.ids, self.labels, self.device = model, ids, labels, device
        self.dtype = autocast_dtype
        self.count = int((labels[:, 1:] != -100).sum())  # the global token count, known on the host
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def autocast(self):
        if self.dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def unavailable(self, method: str) -> str | None:
        """Why ``method`` cannot run here (None: it can)."""
        if method.startswith("forgetful_"):
            try:
                check_loss_backend(method.removeprefix("forgetful_"), self.device)
            except ForgetfulError as exc:
                return str(exc)
            return None
        if method in ("liger_all", "cce_all"):
            package = {"liger_all": "liger_kernel", "cce_all": "cut_cross_entropy"}[method]
            if self.device.type != "cuda":
                return f"{method} runs only on a CUDA GPU (Triton kernels)"
            if not kernel_available(package):
                return f"{package} is not installed (pip install 'forgetful[gpu]')"
        return None

    def loss_fn(self, method: str):
        model, ids, labels = self.model, self.ids, self.labels
        if method == "hf_plain":
            return lambda: model(input_ids=ids, labels=labels, use_cache=False).loss
        if method.startswith("forgetful_"):
            backend = method.removeprefix("forgetful_")
            return lambda: token_nll(model, ids, labels, loss_backend=backend).nll.sum() / self.count
        weight = model.get_output_embeddings().weight
        base = model.base_model
        if method == "liger_all":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)

            def liger_all():
                hidden = base(input_ids=ids, use_cache=False).last_hidden_state
                h = hidden.reshape(-1, hidden.shape[-1])
                return liger_fused_linear_cross_entropy(
                    h, weight, shifted, ignore_index=-100, reduction="mean", softcap=self.softcap
                )

            return liger_all
        if method == "cce_all":
            from cut_cross_entropy import linear_cross_entropy

            dtype = self.dtype or torch.bfloat16

            def cce_all():
                hidden = base(input_ids=ids, use_cache=False).last_hidden_state
                return linear_cross_entropy(
                    e=hidden.to(dtype),
                    c=weight.to(dtype),
                    targets=labels,
                    ignore_index=-100,
                    softcap=self.softcap,
                    reduction="mean",
                    shift=True,
                )

            return cce_all
        raise ValueError(method)

    def step_fn(self, method: str):
        loss_fn = self.loss_fn(method)
        model = self.model

        def step():
            model.zero_grad(set_to_none=True)
            with self.autocast():
                loss = loss_fn()
            loss.backward()
            return loss

        return step


def checked_grads(model, check_rows: int) -> dict[str, torch.Tensor]:
    """A few gradients as float32 CPU copies: the LM head's first rows, the first 2-D weight of the
    first layer, the last 1-D parameter (the final norm)."""
    named = dict(model.named_parameters())
    head = model.get_output_embeddings().weight
    head_name = next(n for n, p in named.items() if p is head)
    first_2d = next(n for n, p in named.items() if p.dim() == 2 and p is not head and "emb" not in n and "wpe" not in n)
    last_1d = [n for n, p in named.items() if p.dim() == 1][-1]
    out = {}
    for name, rows in ((head_name, check_rows), (first_2d, None), (last_1d, None)):
        g = named[name].grad
        if g is None:
            continue
        out[name] = (g[:rows] if rows else g).detach().float().cpu()
    return out


def agreement(loss: float, grads: dict, ref_loss: float, ref_grads: dict) -> dict:
    cos, rel = {}, {}
    for name, ref in ref_grads.items():
        g = grads.get(name)
        if g is None:
            continue
        cos[name] = float(F.cosine_similarity(g.flatten().double(), ref.flatten().double(), dim=0))
        rel[name] = float((g - ref).norm() / ref.norm().clamp(min=1e-30))
    return {
        "loss_rel_diff": abs(loss - ref_loss) / max(abs(ref_loss), 1e-30),
        "grad_cos": cos,
        "grad_rel_err": rel,
        "grad_cos_min": min(cos.values()) if cos else None,
        "grad_rel_err_max": max(rel.values()) if rel else None,
    }


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


def bench_model(arch: str, batch: int, seq: int, a, device, results: dict) -> None:
    t0 = time.perf_counter()
    model = build_lm(arch, seq, device, on_device=device.type == "cuda")
    model.train()
    vocab = model.config.vocab_size
    dtype = torch.bfloat16 if device.type == "cuda" else None
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    print(f"{arch} {batch}x{seq}: built in {time.perf_counter() - t0:.1f} s", flush=True)
    for d_i, density in enumerate(a.densities):
        labels = random_labels(ids, density, a.seed + 1 + d_i)
        bench = Bench(model, ids, labels, device, dtype)
        rows: dict[str, dict] = {}
        steps = {}
        for method in a.methods:
            row = rows[method] = {
                "model": arch,
                "batch": batch,
                "seq": seq,
                "vocab": vocab,
                "density": density,
                "method": method,
                "scored_tokens": bench.count,
            }
            reason = bench.unavailable(method)
            if reason:
                row["skipped"] = reason
                continue
            try:  # first run: warm-up (kernel compilation) and the agreement check
                steps[method] = bench.step_fn(method)
                loss = float(steps[method]().detach().float())
                row["loss"] = loss
                row["grads"] = checked_grads(model, a.check_rows)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                row["error"] = first_line(exc)
                steps.pop(method, None)
                if a.verbose:
                    traceback.print_exc()
            cleanup(model, device)
        ref = rows.get("forgetful_dense", {})
        for row in rows.values():  # agreement with forgetful_dense, then the gradient copies go
            if "grads" in row and "grads" in ref:
                row.update(agreement(row["loss"], row["grads"], ref["loss"], ref["grads"]))
        for row in rows.values():
            row.pop("grads", None)
        for method in list(steps):
            try:
                rows[method].update(measure_peak(steps[method], device))
            except Exception as exc:  # noqa: BLE001
                rows[method]["error"] = first_line(exc)
                steps.pop(method)
            cleanup(model, device)
        times: dict[str, list[list[float]]] = {m: [] for m in steps}
        for _ in range(a.rounds):
            for method in list(steps):
                try:
                    times[method].append(timings_ms(steps[method], device, warmup=a.warmup, repeats=a.repeats))
                except Exception as exc:  # noqa: BLE001
                    rows[method]["error"] = first_line(exc)
                    steps.pop(method)
                cleanup(model, device)
        for method, rounds in times.items():
            if method not in steps or not rounds:
                continue
            flat = [t for r in rounds for t in r]
            rows[method]["ms"] = statistics.median(flat)
            rows[method]["ms_spread"] = spread([statistics.median(r) for r in rounds])
            rows[method]["ms_all"] = flat
        results["rows"].extend(rows.values())
        print_rows(list(rows.values()))
    del model
    cleanup_all(device)


def cleanup_all(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratios(rows: list[dict]) -> None:
    """Each row's time and memory against forgetful_dense and cce_all of the same model and density."""
    by_key = {(r["model"], r["density"], r["method"]): r for r in rows}
    for r in rows:
        for ref in ("forgetful_dense", "cce_all", "hf_plain"):
            other = by_key.get((r["model"], r["density"], ref))
            if other is None or other is r:
                continue
            if "ms" in r and "ms" in other:
                r[f"ms_vs_{ref}"] = r["ms"] / other["ms"]
            if "peak_gib" in r and "peak_gib" in other:
                r[f"peak_vs_{ref}"] = r["peak_gib"] / other["peak_gib"]


def fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, int | float) and math.isfinite(x) else "-"


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        status = r.get("error") or r.get("skipped") or ""
        print(
            f"  {r['model']:<11} {r['density']:>4} {r['method']:<18} {fmt(r.get('ms'), '9.2f')} ms "
            f"{fmt(r.get('peak_gib'), '7.3f')} GiB  loss {fmt(r.get('loss'), '.5f')} "
            f"rel {fmt(r.get('loss_rel_diff'), '.1e')} cos {fmt(r.get('grad_cos_min'), '.6f')}  {status[:90]}",
            flush=True,
        )


def table(rows: list[dict]) -> str:
    lines = [
        f"{'model':<11} {'dens':>4} {'method':<18} {'ms':>9} {'min-max':>15} {'peak GiB':>8} {'vs dense':>8} "
        f"{'vs cce_all':>10} {'loss rel':>8} {'grad cos':>9}  status"
    ]
    for r in rows:
        sp = r.get("ms_spread") or {"min": None, "max": None}
        status = (r.get("error") or r.get("skipped") or "ok")[:60]
        lines.append(
            f"{r['model']:<11} {r['density']:>4} {r['method']:<18} {fmt(r.get('ms'), '9.2f')} "
            f"{fmt(sp.get('min'), '7.2f')}-{fmt(sp.get('max'), '7.2f')} {fmt(r.get('peak_gib'), '8.3f')} "
            f"{fmt(r.get('ms_vs_forgetful_dense'), '8.3f')} {fmt(r.get('ms_vs_cce_all'), '10.3f')} "
            f"{fmt(r.get('loss_rel_diff'), '8.1e')} {fmt(r.get('grad_cos_min'), '9.6f')}  {status}"
        )
    return "\n".join(lines)


def cpu_memory(a) -> dict:
    """Peak live-tensor memory (CPU, float32) of one forward + backward: chunked vs dense."""
    device = torch.device("cpu")
    model = build_lm(a.cpu_arch, a.cpu_seq, device, vocab_size=a.vocab)
    model.train()
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, a.vocab, (a.cpu_batch, a.cpu_seq), generator=g)
    labels = random_labels(ids, 1.0, a.seed + 1)
    bench = Bench(model, ids, labels, device, None)
    rows = []
    ref = None
    for method in ("forgetful_dense", "forgetful_chunked"):
        step = bench.step_fn(method)
        loss = float(step().detach())  # warm-up, and the agreement check
        grads = checked_grads(model, a.check_rows)
        model.zero_grad(set_to_none=True)
        mb, kind = peak_memory_mb(step, device)
        model.zero_grad(set_to_none=True)
        ms = timings_ms(step, device, warmup=0, repeats=a.repeats)
        row = {
            "method": method,
            "peak_mb": mb,
            "memory_kind": kind,
            "ms": statistics.median(ms),
            "ms_all": ms,
            "loss": loss,
        }
        if ref is None:
            ref = (loss, grads)
        row.update(agreement(loss, grads, *ref))
        rows.append(row)
        model.zero_grad(set_to_none=True)
        print(f"{method}: peak {mb:.1f} MB ({kind}), {row['ms']:.0f} ms, loss {loss:.6f}", flush=True)
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


def kernel_versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("cut-cross-entropy", "liger-kernel", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="arch:BATCHxSEQ, comma separated (archs of common.py)")
    p.add_argument("--densities", default="1.0,0.5,0.1")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before each round's repeats")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, round-robin over the methods")
    p.add_argument("--check-rows", type=int, default=8192, help="rows of the LM head gradient compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failing method")
    p.add_argument("--cpu-memory", action="store_true", help="the CPU memory measurement (chunked vs dense) only")
    p.add_argument("--vocab", type=int, default=32000, help="--cpu-memory: vocabulary size")
    p.add_argument("--cpu-arch", default="llama-tiny", help="--cpu-memory: model shape (common.py)")
    p.add_argument("--cpu-batch", type=int, default=8)
    p.add_argument("--cpu-seq", type=int, default=256)
    p.add_argument("--out", default="bench_selective.json")
    a = p.parse_args()
    a.densities = [float(x) for x in a.densities.split(",")]
    a.methods = [m.strip() for m in a.methods.split(",")]
    unknown = sorted(set(a.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if a.cpu_memory:
        torch.manual_seed(a.seed)
        out = cpu_memory(a)
        keys = ("vocab", "cpu_arch", "cpu_batch", "cpu_seq", "repeats", "check_rows", "seed")
        config = {"density": 1.0, **{k: getattr(a, k) for k in keys}}
        results = {"env": environment(torch.device("cpu")), "config": config, **out}
        write(results, a.out)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {**environment(device), "kernels": kernel_versions()}
    results = {"env": env, "config": {**vars(a), "chunk_elements": CHUNK_ELEMENTS}, "rows": []}
    results["config"]["cce_all_filter_eps"] = "CCE default (PyPI 25.1.1: 'high' = eps/32, filtered gradients)"
    results["config"]["forgetful_cce_filter_eps"] = None
    start = time.perf_counter()
    for arch, batch, seq in parse_models(a.models):
        try:
            bench_model(arch, batch, seq, a, device, results)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built or run: recorded
            results.setdefault("model_errors", {})[f"{arch}:{batch}x{seq}"] = first_line(exc)
            print(f"{arch}: {first_line(exc)}", flush=True)
            cleanup_all(device)
    ratios(results["rows"])
    results["total_s"] = time.perf_counter() - start
    write(results, a.out)
    print(table(results["rows"]))
    print(f"total {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
