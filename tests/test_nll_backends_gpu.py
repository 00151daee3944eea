"""The Liger and chunked backends on a CUDA GPU against a float64 reference: per-token NLL and the
gradients of the hidden states, the head weight and its bias, with one weight per token (``summed``:
gradients from the forward) and with a weight per token (recomputed in the backward). Skipped
without a GPU and liger-kernel (CI has neither; ``benchmarks/gpu_session.sh bench_selective`` runs it
on the device before timing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from forgetful.measure import gradient_cosine
from forgetful.nll_backends import HeadSpec, kernel_available
from forgetful.nll_kernels import linear_nll

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernel_available("liger_kernel")), reason="needs a CUDA GPU and liger-kernel"
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("backend", ["liger", "chunked"])
@pytest.mark.parametrize("uniform", [True, False], ids=["mean", "weighted"])
@pytest.mark.parametrize("summed", [True, False], ids=["summed", "per-token"])
def test_fused_backends_match_float64_on_the_gpu(backend, uniform, summed):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, vocab = 3000, 256, 20000
    h = torch.randn(n, d, device="cuda", generator=g).requires_grad_(True)
    w = (torch.randn(vocab, d, device="cuda", generator=g) * 0.05).requires_grad_(True)
    b = (torch.randn(vocab, device="cuda", generator=g) * 0.1).requires_grad_(True)
    t = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    up = torch.full((n,), 1 / n, device="cuda") if uniform else torch.rand(n, device="cuda", generator=g) / n
    with torch.autocast("cuda", dtype=torch.bfloat16):
        nll = linear_nll(h, t, HeadSpec(w, b, lambda x: F.linear(x, w, b)), backend, summed=summed)
    (nll * up).sum().backward()
    rh, rw, rb = (x.detach().double().requires_grad_(True) for x in (h, w, b))
    ref = F.cross_entropy(F.linear(rh, rw, rb), t, reduction="none")
    (ref * up.double()).sum().backward()
    assert nll.dtype == torch.float32 and _rel(nll, ref) < 1e-2  # bf16 operands
    for got, want in ((h.grad, rh.grad), (w.grad, rw.grad), (b.grad, rb.grad)):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert _rel(got, want) < 2e-2 and gradient_cosine(got, want) > 0.9999
