"""Loss backends: the LM head and the cross-entropy of the scored tokens, computed together.

Everything that scores tokens (the selective-loss Trainer, REINFORCE target rewards, TOFU answer
probabilities) goes through :func:`~forgetful.nll_kernels.linear_nll`, which takes the hidden states of the scored
positions ``h [N, d]``, the LM head and the targets ``[N]`` and returns the per-token NLL
(float32, connected to the graph). One option, ``loss_backend``, picks how:

* ``dense``: the head's own forward on all ``N`` rows, then ``F.cross_entropy`` (``[N, V]`` logits
  at once; :func:`forgetful.nll.token_nll` keeps its forward pre-hook path for it).
* ``chunked``: pure PyTorch. The head and the cross-entropy run in chunks of rows; the backward
  recomputes each chunk's logits, so at most one chunk of ``[rows, V]`` logits is alive
  (:class:`~forgetful.nll_kernels.ChunkedLinearNLL`, or per-chunk checkpointing of the head's own forward when the head is
  not one weight matrix). Logit soft-capping, a head bias, tied embeddings and LoRA on the head are
  handled.
* ``cce``: Apple's Cut Cross-Entropy (``cut_cross_entropy.linear_cross_entropy``, PyPI 25.1.1):
  CUDA only, bf16/fp16 only (its backward refuses float32), no bias. Called with
  ``filter_eps=None`` (CCE's default skips gradient tiles below bf16's eps / 32), yet its gradients
  are still approximate: 25.1.1 sums the gradients of the hidden states and of the head weight
  across blocks into tensors of the input's dtype (bf16 atomic adds: ``dc = zeros_like(c,
  dtype=e.dtype)`` in ``cce_backward.py``) and has no float32 accumulation (later CCE builds'
  ``accum_e_fp32`` / ``accum_c_fp32``, not on PyPI). So ``cce`` is available by name, never chosen by
  ``auto``.
* ``liger``: Liger's fused linear cross-entropy (``liger_kernel`` 0.8.5: its chunked forward
  ``fused_linear_cross_entropy_forward`` with ``reduction="none"`` and its Triton cross-entropy
  kernel, driven by :class:`~forgetful.nll_kernels.LigerLinearNLL`): CUDA only. Called with ``accum_dtype=float32``: the
  head weight gradient is summed over its row chunks in float32 and rounded to the weight's dtype
  once, and each chunk's hidden-state gradient is one matmul, as ``dense`` computes them.
* ``auto`` (the default everywhere, :data:`DEFAULT_LOSS_BACKEND`): ``dense`` when every row is
  scored on its last few tokens only (REINFORCE's targets: the model's own ``logits_to_keep``, no
  host synchronisation), else ``liger`` on CUDA when it is installed and the head is one weight
  matrix, else ``chunked``: the fused kernel whose gradients are those of ``dense`` up to rounding,
  else the exact pure-PyTorch one. It never fails because a GPU package is missing.

``summed=True`` (:func:`~forgetful.nll_kernels.linear_nll`, :func:`forgetful.nll.token_nll`): the caller reduces the
per-token NLL with one weight for every token (the selective-loss Trainer's sum over a global
count). ``chunked`` and ``liger`` then compute the gradients in the forward, while each chunk's
logits are there (three head matmuls in all instead of four), and hold them until the backward,
which scales them by the upstream gradient after checking that it is the same for every token (one
host synchronisation); otherwise it recomputes with each token's weight. The hint saves time and
never changes a gradient.

The kernels and :func:`~forgetful.nll_kernels.linear_nll` are :mod:`forgetful.nll_kernels`'; this
module holds the option, its resolver and how the head is read. The GPU kernels are the optional
extra ``forgetful[gpu]``; they are imported only when asked for.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import ForgetfulError

IGNORE_INDEX = -100

LossBackend = Literal["auto", "dense", "chunked", "cce", "liger"]
LOSS_BACKENDS: tuple[str, ...] = ("auto", "dense", "chunked", "cce", "liger")
DEFAULT_LOSS_BACKEND = "auto"
LOSS_BACKEND_HELP = (
    "How the LM head and cross-entropy are computed at scored positions: dense (all their logits at once), "
    "chunked (pure PyTorch, a chunk of logits at a time, recomputed in backward), cce (Cut Cross-Entropy, CUDA, "
    "bf16/fp16; approximate gradients: bf16 accumulation), liger (Liger fused linear CE, CUDA), auto (dense for short "
    "targets at the end of every row, else liger on CUDA when installed, else chunked). cce and liger: "
    "pip install 'forgetful[gpu]'."
)


def loss_backend_field():
    """The ``loss_backend`` option of every training config: one default, one help."""
    from dataclasses import field

    return field(default=DEFAULT_LOSS_BACKEND, metadata={"help": LOSS_BACKEND_HELP})


GPU_PACKAGES = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}
INSTALL_HINT = "pip install 'forgetful[gpu]'"

LOW_PRECISION = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------------------------


@functools.cache
def kernel_available(package: str) -> bool:
    """Whether ``package`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def cuda_usable(device: torch.device | str | None) -> bool:
    """Whether the work on ``device`` runs on a CUDA GPU (``None``: any GPU is there)."""
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def check_loss_backend(name: str, device: torch.device | str | None = None) -> None:
    """One-line :class:`ForgetfulError` when ``name`` is not a backend, or is a GPU kernel that
    cannot run here (no CUDA on ``device``, or its package is not installed)."""
    if name not in LOSS_BACKENDS:
        raise ForgetfulError(f"loss_backend must be one of {', '.join(LOSS_BACKENDS)}, got {name!r}")
    if name not in GPU_PACKAGES:
        return
    where = "this machine has no CUDA GPU" if device is None else f"this run is on {torch.device(device).type}"
    if not cuda_usable(device):
        raise ForgetfulError(
            f"loss_backend='{name}' runs only on a CUDA GPU (Triton kernels) and {where}: "
            "use loss_backend='chunked' (or auto)"
        )
    if not kernel_available(GPU_PACKAGES[name]):
        raise ForgetfulError(
            f"loss_backend='{name}' needs the {GPU_PACKAGES[name]} package, which is not installed: "
            f"{INSTALL_HINT}, or use loss_backend='chunked' (or auto)"
        )


def training_loss_backend(args) -> str:
    """The loss backend a training config asks for, checked for the machine it trains on: the one
    place every trainer (selective-loss, unlearning, REINFORCE) resolves its option. ``auto`` stays
    ``auto`` here (:func:`resolve_loss_backend` makes it concrete per call, from the head and the
    dtype). ``use_liger_kernel`` (the HF Trainer's switch for Liger's fused linear cross-entropy) is
    honoured through the ``liger`` backend, since the losses here bypass the model's own; with
    another explicit backend it is refused."""
    backend = getattr(args, "loss_backend", DEFAULT_LOSS_BACKEND)
    if getattr(args, "use_liger_kernel", False):
        if backend not in ("auto", "liger"):
            raise ForgetfulError(
                f"use_liger_kernel asks for Liger's fused linear cross-entropy but loss_backend='{backend}': "
                "set loss_backend liger (or auto), or drop use_liger_kernel"
            )
        backend = "liger"
    use_cpu = getattr(args, "use_cpu", False) or not torch.cuda.is_available()
    check_loss_backend(backend, torch.device("cpu" if use_cpu else "cuda"))
    return backend


def compute_dtype(h: torch.Tensor, weight_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on for ``h``'s device, else the
    weight's (as ``nn.Linear`` would)."""
    kind = h.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight_dtype or h.dtype


def resolve_loss_backend(
    name: str, device: torch.device | str, dtype: torch.dtype | None = None, head=None, targets_at_end: bool = False
) -> str:
    """``auto`` made concrete (the one place it is): ``dense`` for ``targets_at_end`` (the last few
    tokens of every row scored, as REINFORCE's targets are), else ``liger`` on CUDA when installed and
    the head is one weight matrix (any dtype, with or without a bias), else ``chunked``; any other
    name unchanged. Only backends whose gradients are ``dense``'s up to rounding are chosen: never
    ``cce``, whose 25.1.1 backward accumulates in bf16 (module docstring). ``dtype`` (the head's
    compute dtype) is accepted for callers; no exact backend depends on it."""
    if name != "auto":
        return name
    if targets_at_end:
        return "dense"  # a few positions per row, selected by the model itself: nothing to save
    usable = cuda_usable(device) and kernel_available(GPU_PACKAGES["liger"])
    if head is not None:
        usable = usable and head.weight is not None
    return "liger" if usable else "chunked"


# --------------------------------------------------------------------------------------------
# The head as the kernels need it
# --------------------------------------------------------------------------------------------


@dataclass
class HeadSpec:
    """What computes the logits: one weight matrix (``[V, d]``, with an optional bias) when the head
    has one, else ``call`` (the head's own forward, used chunk by chunk); then the logit
    soft-capping (``cap * tanh(z / cap)``) and a scale folded into the hidden states."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    call: Callable[[torch.Tensor], torch.Tensor]
    softcap: float | None = None
    scale: float | None = None
    kind: str = "linear"
    vocab: int = 0


def _plain_linear(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Linear)
        and isinstance(w, torch.Tensor)
        and w.is_floating_point()
        and w.dim() == 2
        and tuple(w.shape) == (module.out_features, module.in_features)
    )


def _lora_weight(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The effective weight ``W + sum(scaling * B @ A)`` (and bias) of a PEFT LoRA ``Linear`` when
    it is exactly that: vanilla LoRA (no DoRA or other variant, no LoRA bias) and no dropout in
    training. ``None`` when the layer must be called instead."""
    base = head.get_base_layer()
    if not _plain_linear(base):
        return None
    weight = base.weight
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return weight, base.bias
    variants = getattr(head, "lora_variant", {}) or {}
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        a, b = head.lora_A[name], head.lora_B[name]
        dropout = head.lora_dropout[name]
        if name in variants or getattr(b, "bias", None) is not None or not (_plain_linear(a) and _plain_linear(b)):
            return None
        if head.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            return None
        delta = b.weight @ a.weight
        if getattr(head, "fan_in_fan_out", False):
            delta = delta.T
        weight = weight + delta.to(weight.dtype) * head.scaling[name]
    return weight, base.bias


def _config_value(config, name: str):
    """``config.name``, or the text config's (multimodal models keep the LM's options there)."""
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        try:
            value = getattr(config.get_text_config(), name, None)
        except (AttributeError, ValueError, TypeError):
            value = None
    return value


def head_spec(head: nn.Module, call: Callable | None = None, config=None) -> HeadSpec:
    """Describe ``head`` (an ``nn.Linear``, tied or not, with or without bias; a PEFT LoRA
    ``Linear``; anything else is called chunk by chunk). ``call`` is the head's forward to use for
    the generic path (default: the module); ``config`` gives the soft-capping and logit scales."""
    call = call or head
    softcap = _config_value(config, "final_logit_softcapping")
    scale = 1.0
    if _config_value(config, "logit_scale") is not None:  # Cohere: logits * logit_scale
        scale *= float(_config_value(config, "logit_scale"))
    if _config_value(config, "logits_scaling") is not None:  # Granite: logits / logits_scaling
        scale /= float(_config_value(config, "logits_scaling"))
    vocab = getattr(head, "out_features", None) or getattr(config, "vocab_size", None) or 32768
    kw = {"softcap": float(softcap) if softcap else None, "scale": None if scale == 1.0 else scale, "vocab": int(vocab)}
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # PEFT modules_to_save=["lm_head"]
        active = list(getattr(head, "active_adapters", []) or [])
        inner = head.original_module if head.disable_adapters or not active else head.modules_to_save[active[0]]
        if len(active) <= 1 and _plain_linear(inner):
            return HeadSpec(inner.weight, inner.bias, call, kind="linear", **kw)
    if _plain_linear(head):
        return HeadSpec(head.weight, head.bias, call, kind="linear", **kw)
    if hasattr(head, "get_base_layer") and hasattr(head, "lora_A") and hasattr(head, "active_adapters"):
        merged = _lora_weight(head)
        if merged is not None:
            return HeadSpec(merged[0], merged[1], call, kind="lora", **kw)
    return HeadSpec(None, None, call, kind=type(head).__name__, **kw)
