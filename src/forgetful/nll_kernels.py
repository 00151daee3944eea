"""The loss backends' kernels and their one entry point, :func:`linear_nll` (the backends, how one
is chosen and how the head is read: :mod:`forgetful.nll_backends`).

* ``chunked`` (:class:`ChunkedLinearNLL`, :func:`chunked_pass`): the head and the cross-entropy a
  chunk of rows at a time, in pure PyTorch; per-chunk checkpointing of the head's own forward when
  the head is not one weight matrix;
* ``cce``: Cut Cross-Entropy, imported when asked for;
* ``liger`` (:class:`LigerLinearNLL`): Liger's chunked forward and Triton kernel, imported when asked for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .errors import ForgetfulError
from .nll_backends import IGNORE_INDEX, LOW_PRECISION, HeadSpec, check_loss_backend, compute_dtype, resolve_loss_backend

#: Elements of one chunk of logits in the chunked backend (2**25 float32 = 128 MiB): about 260 rows
#: for a 128k vocabulary, 650 for GPT-2's 50k.
CHUNK_ELEMENTS = 1 << 25

# --------------------------------------------------------------------------------------------
# chunked: pure PyTorch
# --------------------------------------------------------------------------------------------


def chunk_rows(vocab: int, elements: int | None = None) -> int:
    """Rows per chunk so that one chunk of logits has about ``elements`` entries (a multiple of 8)."""
    rows = max(1, (elements or CHUNK_ELEMENTS) // max(vocab, 1))
    return rows if rows < 16 else rows // 8 * 8


def _capped_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None):
    """float32 logits of one chunk (after soft-capping) and, with soft-capping, ``tanh(z / cap)``."""
    z = F.linear(h, w, b).float()
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()
    return t * softcap, t


_OUT_DTYPE_OK: dict = {}


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in float32 and ``a``, ``b`` maybe in bf16/fp16: on CUDA through
    ``addmm(out_dtype=float32)`` (torch >= 2.8, as Liger does), else through a temporary product."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _OUT_DTYPE_OK.get(acc.device, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_OK[acc.device] = False
    acc.add_(a @ b)


def chunked_pass(h, weight, bias, targets, softcap, rows, dtype, grad_nll=None, lse=None, needs=(True, True, True)):
    """One pass over ``h`` in chunks of ``rows`` rows: the per-token NLL and log-sum-exp (when ``lse``
    is not given), and with ``grad_nll`` (``[N]``, the upstream gradient of each token's NLL) the
    gradients of ``sum(grad_nll * nll)`` w.r.t. ``h``, the weight and the bias (those ``needs`` asks
    for). The matmuls run in ``dtype``, softmax and the logits' gradient in float32, the weight and
    bias gradients are summed over the chunks in float32. Returns ``(nll, lse, dh, dw, db)``."""
    with torch.autocast(h.device.type, enabled=False):
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        n = h.shape[0]
        nll = None
        if lse is None:
            nll = torch.empty(n, dtype=torch.float32, device=h.device)
            lse = torch.empty(n, dtype=torch.float32, device=h.device)
        grads = grad_nll is not None
        dh = torch.empty_like(h) if grads and needs[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads and needs[1] else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if grads and needs[2] else None
        for s in range(0, n, rows):
            hc, tc = h[s : s + rows].to(dtype), targets[s : s + rows]
            z, t = _capped_logits(hc, w, b, softcap)
            if nll is not None:
                lse_c = torch.logsumexp(z, dim=-1)
                lse[s : s + rows] = lse_c
                nll[s : s + rows] = lse_c - z.gather(1, tc[:, None]).squeeze(1)
            if not grads:
                continue
            p = z.sub_(lse[s : s + rows, None]).exp_()  # softmax, in place of the logits
            del z
            p[torch.arange(p.shape[0], device=p.device), tc] -= 1.0
            p.mul_(grad_nll[s : s + rows, None])
            if t is not None:  # d(cap * tanh(x / cap))/dx = 1 - tanh^2
                p.mul_(t.square_().neg_().add_(1.0))
                del t
            if db is not None:
                db += p.sum(0)
            dz = p.to(dtype)
            del p
            if dh is not None:
                dh[s : s + rows] = dz @ w
            if dw is not None:
                _accumulate(dw, dz.T, hc)
            del dz, hc
    return nll, lse, dh, dw, db


def _use_forward_grads(ctx, grad_nll: torch.Tensor, dtypes: tuple = (None, None, None)) -> tuple | None:
    """The gradients a ``summed`` forward computed for a weight of one per token, scaled by the
    upstream gradient when it is the same for every token (one host synchronisation: the check is
    what keeps the shortcut exact), or ``None`` when the backward must recompute: the forward did not
    compute them, the upstream gradients differ between tokens, or this is a second backward through
    the graph (``retain_graph``: the first one scaled them in place). A gradient whose ``dtypes``
    entry differs from its own is cast first, then scaled (no second rounding in a low precision)."""
    grads = getattr(ctx, "forward_grads", None)
    ctx.forward_grads = None
    if grads is None:
        return None
    c = grad_nll[:1]
    if not bool((grad_nll == c).all()):
        return None
    return tuple(
        None if g is None else (g if dt in (None, g.dtype) else g.to(dt)).mul_(c.to(dt or g.dtype))
        for g, dt in zip(grads, dtypes)
    )


class ChunkedLinearNLL(torch.autograd.Function):
    """``nll[i] = logsumexp(z_i) - z_i[t_i]`` with ``z = cap * tanh((h W^T + b) / cap)``, computed
    ``rows`` rows at a time (:func:`chunked_pass`). Saves ``h``, the weight and the per-row
    log-sum-exp; the backward recomputes each chunk's logits (four head matmuls in all). With
    ``summed`` (the caller reduces the NLL with one weight for every token: a sum or a mean) the
    forward also computes the gradients for a weight of one (three matmuls in all, the gradients of
    ``h`` and of the head held until the backward), which the backward scales when the upstream
    gradient is indeed uniform and recomputes otherwise."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, softcap, rows, dtype, summed=False):
        needs = ctx.needs_input_grad[:3]
        ones = torch.ones(h.shape[0], device=h.device) if summed and any(needs) else None
        nll, lse, dh, dw, db = chunked_pass(h, weight, bias, targets, softcap, rows, dtype, ones, needs=needs)
        if ones is not None:
            ctx.forward_grads = (dh, dw, db)
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.softcap, ctx.rows, ctx.dtype = softcap, rows, dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        h, weight, bias, targets, lse = ctx.saved_tensors
        grad_nll = grad_nll.float()
        grads = _use_forward_grads(ctx, grad_nll)
        if grads is None:
            needs = ctx.needs_input_grad[:3]
            _, _, *grads = chunked_pass(
                h, weight, bias, targets, ctx.softcap, ctx.rows, ctx.dtype, grad_nll, lse, needs
            )
        dh, dw, db = grads
        return (
            dh,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def _call_nll(call, h: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    z = call(h).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, targets, reduction="none")


def _chunked_calls(spec: HeadSpec, h: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
    """The generic chunked path: the head's own forward on each chunk, checkpointed (recomputed in
    the backward), so one chunk of logits is alive at a time."""
    grad = torch.is_grad_enabled()
    parts = []
    for s in range(0, h.shape[0], rows):
        hc, tc = h[s : s + rows], targets[s : s + rows]
        if grad:
            parts.append(checkpoint(_call_nll, spec.call, hc, tc, spec.softcap, use_reentrant=False))
        else:
            parts.append(_call_nll(spec.call, hc, tc, spec.softcap))
    return torch.cat(parts) if parts else _empty_nll(spec, h)


def _empty_nll(spec: HeadSpec, h: torch.Tensor) -> torch.Tensor:
    """A ``[0]`` float32 NLL connected to ``h`` and the head (zero gradients, no NaN, no DDP hang)."""
    if spec.weight is not None:
        return (
            F.linear(h, spec.weight.to(h.dtype), None if spec.bias is None else spec.bias.to(h.dtype)).float().sum(-1)
        )
    return spec.call(h).float().sum(-1)


# --------------------------------------------------------------------------------------------
# The GPU kernels
# --------------------------------------------------------------------------------------------


def _needs_weight(spec: HeadSpec, backend: str) -> torch.Tensor:
    if spec.weight is None:
        raise ForgetfulError(
            f"loss_backend='{backend}' needs an LM head with one weight matrix (nn.Linear, or LoRA without "
            f"dropout in training); this head is {spec.kind}: use loss_backend='chunked'"
        )
    return spec.weight


def _cce_nll(spec: HeadSpec, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    weight = _needs_weight(spec, "cce")
    if spec.bias is not None:
        raise ForgetfulError(
            "loss_backend='cce': cut-cross-entropy 25.1.1 has no bias for the LM head: use loss_backend='liger' or 'chunked'"
        )
    dtype = compute_dtype(h, weight.dtype)
    if dtype not in LOW_PRECISION:
        raise ForgetfulError(
            f"loss_backend='cce' needs bf16 or fp16 (cut-cross-entropy 25.1.1 has no float32 backward) and the head "
            f"computes in {str(dtype).removeprefix('torch.')}: train with --bf16 (autocast) or use loss_backend='chunked'"
        )
    # keywords only: the argument order differs between CCE builds
    return linear_cross_entropy(
        e=h.to(dtype),
        c=weight.to(dtype),
        targets=targets,
        ignore_index=IGNORE_INDEX,
        softcap=spec.softcap,
        reduction="none",
        filter_eps=None,  # no skipped gradient tiles (CCE's default); its bf16 accumulation stays (docstring)
    ).float()


class LigerLinearNLL(torch.autograd.Function):
    """Per-token NLL through Liger's fused linear cross-entropy (its chunked forward and Triton
    cross-entropy kernel, ``reduction="none"``, the head's weight and bias gradients summed over its
    chunks in float32 and rounded to their dtype once, as ``dense``'s single matmul rounds them).
    Liger's own autograd function, given ``reduction="none"``, recomputes every chunk in the backward
    (four head matmuls); with ``summed`` this one computes the gradients in the forward for a weight
    of one per token, as Liger's mean and sum do (three matmuls), and the backward scales them when
    the upstream gradient is uniform, else recomputes with each token's weight through Liger's
    ``token_grad_output`` (:func:`_use_forward_grads`)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, bias, targets, softcap, summed=False):
        needs = ctx.needs_input_grad[:3]
        speculate = bool(summed and any(needs))
        loss, *grads = _liger_pass(h, weight, bias, targets, softcap, speculate, needs)
        if speculate:
            ctx.forward_grads = tuple(grads)
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.softcap = softcap
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_nll):
        h, weight, bias, targets = ctx.saved_tensors
        dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        grads = _use_forward_grads(ctx, grad_nll.float(), dtypes)
        if grads is None:
            _, *grads = _liger_pass(h, weight, bias, targets, ctx.softcap, True, ctx.needs_input_grad[:3], grad_nll)
        dh, dw, db = grads
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None, None


#: Logits per Liger chunk (2**26: 128 MiB in bf16; about 520 rows for a 128k vocabulary, 1,400 for
#: 49k). Liger's own rule sizes a chunk as ``[B*T, d]`` elements, so few scored tokens make tiny
#: chunks, and every chunk re-reads and re-writes the float32 weight gradient (``8 V d`` bytes):
#: measured on an H200 (2026-12-06), Llama-1B shape, 819 scored tokens in 16-row chunks: 225 ms a
#: step against dense's 151 ms.
LIGER_CHUNK_ELEMENTS = 1 << 26


def _liger_pass(h, weight, bias, targets, softcap, grads, needs, grad_nll=None):
    """Liger's chunked forward: the per-token loss and, with ``grads``, the gradients for
    ``grad_nll`` (one per token when None) that ``needs`` asks for (None for the others). The
    weight is cast to the autocast dtype once here, not in every chunk's two matmuls; its gradient
    comes back in that dtype, summed in float32 and rounded once (as ``dense``'s bf16 matmul rounds
    it), which also halves what a ``summed`` forward holds for a float32 weight. Chunks of about :data:`LIGER_CHUNK_ELEMENTS` logits, through Liger's
    ``chunk_mem_const``."""
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    n, d = h.shape
    vocab = weight.shape[0]
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    rows = max(1, LIGER_CHUNK_ELEMENTS // vocab)
    loss, *_, dh, dw, db = fused_linear_cross_entropy_forward(
        h, weight, targets, bias=bias, ignore_index=IGNORE_INDEX, reduction="none", softcap=softcap,
        accum_dtype=torch.float32, token_grad_output=grad_nll, compute_gradients=grads,
        weight_requires_grad=needs[1], chunk_mem_const=max(1, math.ceil(vocab * rows / (d * max(n, 1)))),
    )  # fmt: skip
    return loss, *(g if need else None for g, need in zip((dh, dw, db), needs))


def _liger_nll(spec: HeadSpec, h: torch.Tensor, targets: torch.Tensor, summed: bool) -> torch.Tensor:
    weight = _needs_weight(spec, "liger")
    if not torch.is_autocast_enabled(h.device.type) and h.dtype != weight.dtype:
        h = h.to(weight.dtype)  # under autocast _liger_pass casts the weight to the autocast dtype instead
    return LigerLinearNLL.apply(h.contiguous(), weight, spec.bias, targets, spec.softcap, summed).float()


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def linear_nll(
    h: torch.Tensor,
    targets: torch.Tensor,
    spec: HeadSpec,
    backend: str = "chunked",
    *,
    rows: int | None = None,
    summed: bool = False,
) -> torch.Tensor:
    """Per-token NLL ``[N]`` (float32, connected to the graph) of ``targets`` given the hidden
    states ``h [N, d]`` of the scored positions and the head ``spec``. ``backend``: ``dense``,
    ``chunked``, ``cce``, ``liger`` or ``auto``; ``rows`` overrides the chunk size of ``chunked``.
    ``summed``: the caller reduces the NLL with one weight for every token (a sum or a mean, as the
    selective-loss Trainer does), so ``chunked`` and ``liger`` compute the gradients in the forward
    (three head matmuls instead of four); a speed hint only, the backward checks it (one host
    synchronisation) and recomputes when the tokens' upstream gradients differ."""
    check_loss_backend(backend, h.device)
    # inside an autograd Function's forward needs_input_grad ignores no_grad: no gradients for evaluation
    summed = summed and torch.is_grad_enabled()
    if spec.scale is not None:
        h = h * spec.scale
    weight = spec.weight
    dtype = compute_dtype(h, weight.dtype if weight is not None else None)
    backend = resolve_loss_backend(backend, h.device, dtype, spec)
    if backend == "dense":
        return _call_nll(spec.call, h, targets, spec.softcap)
    if h.shape[0] == 0:
        return _empty_nll(spec, h)
    if backend == "cce":
        return _cce_nll(spec, h, targets)
    if backend == "liger":
        return _liger_nll(spec, h, targets, summed)
    if weight is None:
        return _chunked_calls(spec, h, targets, rows or chunk_rows(spec.vocab))
    rows = rows or chunk_rows(weight.shape[0])
    return ChunkedLinearNLL.apply(h, weight, spec.bias, targets, spec.softcap, rows, dtype, summed)
