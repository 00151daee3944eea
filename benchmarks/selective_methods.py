"""The methods that ``bench_selective.py`` compares (its docstring says what each computes), each as a
whole training step and as the loss of given final hidden states, and the agreement of their
gradients with the fp32 dense reference."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from forgetful.errors import ForgetfulError
from forgetful.measure import gradient_cosine
from forgetful.nll import prediction_positions, token_nll
from forgetful.nll_backends import check_loss_backend, compute_dtype, head_spec, resolve_loss_backend
from forgetful.nll_kernels import linear_nll

METHODS = (
    "hf_plain",
    "liger_all",
    "cce_all",
    "cce_gathered",
    "forgetful_dense",
    "forgetful_chunked",
    "forgetful_cce",
    "forgetful_liger",
    "forgetful_auto",
)
PEER_MODULES = {
    "liger_all": "liger_kernel.transformers.functional",
    "cce_all": "cut_cross_entropy",
    "cce_gathered": "cut_cross_entropy",
    "forgetful_liger": "liger_kernel.transformers.functional",
    "forgetful_cce": "cut_cross_entropy",
}
FUSED_PEERS = ("liger_all", "cce_all")


def random_labels(ids: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """Labels as the collator folds them: the token where the (random) loss mask is 1, -100 elsewhere
    and at position 0."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(ids.shape, generator=g) < density
    labels = torch.where(mask, ids.cpu(), torch.full_like(ids.cpu(), -100))
    labels[:, 0] = -100
    return labels.to(ids.device)


def autocast(device, dtype):
    """The steps' autocast: ``dtype`` on ``device``, or off (``None``)."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class Bench:
    """The methods on one model, batch and loss mask: each as a whole training step, and as the loss of
    given final hidden states (for the gradient check)."""

    def __init__(self, model, ids, labels, device, autocast_dtype):
        self.model, self.ids, self.labels, self.device = model, ids, labels, device
        self.dtype = autocast_dtype
        self.positions = prediction_positions(labels)
        self.targets = labels[:, 1:][labels[:, 1:] != -100]
        self.count = int(self.targets.numel())  # the global token count, known on the host
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def autocast(self):
        return autocast(self.device, self.dtype)

    def auto_choice(self) -> str:
        """The backend ``auto`` resolves to here (as :func:`linear_nll` resolves it in the step)."""
        probe = torch.empty(0, device=self.device, dtype=self.head.weight.dtype)  # hidden states on the device
        with self.autocast():
            dtype = compute_dtype(probe, self.head.weight.dtype)
        return resolve_loss_backend("auto", self.device, dtype, head_spec(self.head, config=self.model.config))

    def unavailable(self, method: str) -> str | None:
        """Why ``method`` cannot run here (None: it can)."""
        if method.startswith("forgetful_"):
            try:
                check_loss_backend(method.removeprefix("forgetful_"), self.device)
            except ForgetfulError as exc:
                return str(exc)
        elif method in PEER_MODULES and self.device.type != "cuda":
            return f"{method} runs only on a CUDA GPU (Triton kernels)"
        if method in PEER_MODULES:
            try:
                importlib.import_module(PEER_MODULES[method])
            except Exception as exc:  # noqa: BLE001 - any failure to import is the reason recorded
                return f"{PEER_MODULES[method]} does not import ({first_line(exc)}): pip install 'forgetful[gpu]'"
        return None

    def head_loss(self, method: str):
        """The loss (mean over the trained tokens) of final hidden states ``[B, L, d]``, as ``method``
        computes it from there."""
        model, labels, weight = self.model, self.labels, self.head.weight
        kernel_dtype = self.dtype or torch.bfloat16  # CCE 25.1.1: bf16/fp16 only
        if method == "hf_plain":
            vocab = model.config.vocab_size
            return lambda hidden: model.loss_function(logits=self.head(hidden), labels=labels, vocab_size=vocab)
        if method.startswith("forgetful_"):
            spec = head_spec(self.head, config=model.config)
            backend = method.removeprefix("forgetful_")
            return lambda hidden: (
                linear_nll(hidden[self.positions], self.targets, spec, backend, summed=True).sum() / self.count
            )
        if method == "liger_all":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
            return lambda hidden: liger_fused_linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), weight, shifted, reduction="mean", softcap=self.softcap
            )
        from cut_cross_entropy import linear_cross_entropy

        if method == "cce_all":
            return lambda hidden: linear_cross_entropy(
                e=hidden.to(kernel_dtype), c=weight.to(kernel_dtype), targets=labels, softcap=self.softcap, shift=True
            )
        if method == "cce_gathered":
            return lambda hidden: (
                linear_cross_entropy(
                    e=hidden[self.positions].to(kernel_dtype),
                    c=weight.to(kernel_dtype),
                    targets=self.targets,
                    softcap=self.softcap,
                    reduction="sum",
                )
                / max(self.count, 1)
            )
        raise ValueError(method)

    def step_fn(self, method: str):
        """One training step of the whole model (forward + backward) with ``method``'s loss."""
        model, ids, labels = self.model, self.ids, self.labels
        if method == "hf_plain":
            loss_fn = lambda: model(input_ids=ids, labels=labels, use_cache=False).loss  # noqa: E731
        elif method.startswith("forgetful_"):
            backend = method.removeprefix("forgetful_")
            loss_fn = lambda: token_nll(model, ids, labels, loss_backend=backend, summed=True).nll.sum() / self.count  # noqa: E731
        else:
            head_loss = self.head_loss(method)
            loss_fn = lambda: head_loss(model.base_model(input_ids=ids, use_cache=False).last_hidden_state)  # noqa: E731

        def step():
            model.zero_grad(set_to_none=True)
            with self.autocast():
                loss = loss_fn()
            loss.backward()
            return loss

        return step

    def head_gradients(self, method: str | None, hidden: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """The loss and its gradients w.r.t. ``hidden`` and the head weight, by ``method`` (under the
        step's autocast), or (``None``) by the fp32 dense reference (no autocast, TF32 off)."""
        h = hidden.detach().to(self.device, copy=True).requires_grad_(True)
        self.model.zero_grad(set_to_none=True)
        if method is None:
            w = self.head.weight.detach().float().requires_grad_(True)
            bias = getattr(self.head, "bias", None)
            with torch.autocast(self.device.type, enabled=False):
                z = F.linear(h.float()[self.positions], w, None if bias is None else bias.detach().float())
                if self.softcap:
                    z = self.softcap * torch.tanh(z / self.softcap)
                loss = F.cross_entropy(z, self.targets, reduction="sum") / max(self.count, 1)
            loss.backward()
            return float(loss.detach()), h.grad, w.grad
        with self.autocast():
            loss = self.head_loss(method)(h)
        loss.backward()
        grad_w = self.head.weight.grad
        self.model.zero_grad(set_to_none=True)
        return float(loss.detach().float()), h.grad, grad_w


def agreement(got: tuple, ref: tuple) -> dict:
    loss, gh, gw = got
    ref_loss, rh, rw = ref
    out = {"loss": loss, "loss_rel_diff": abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)}
    out["grad_cosine_hidden"] = gradient_cosine(gh, rh)
    out["grad_cosine_head"] = gradient_cosine(gw, rw) if gw is not None else None
    out["grad_cosine"] = min(c for c in (out["grad_cosine_hidden"], out["grad_cosine_head"]) if c is not None)
    for name, g, r in (("hidden", gh, rh), ("head", gw, rw)):
        if g is not None:
            out[f"grad_rel_err_{name}"] = float((g.float() - r).norm() / r.norm().clamp(min=1e-30))
    return out


def kernel_versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("cut-cross-entropy", "liger-kernel", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
