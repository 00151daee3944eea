"""Per-token negative log-likelihood with vocabulary logits only where a token is scored.

A causal LM computes ``logits = lm_head(hidden)`` for every position; with sparse loss masks
(completion-only, forgetting, RL targets) most of those logits are thrown away, yet they dominate
activation memory (batch x length x vocab). We install a forward pre-hook on the model's output
embedding that replaces its input with the hidden states of the scored positions only, so the
model's own forward (and anything it applies after the head, such as logit soft-capping) runs on
``[1, N, d]`` instead of ``[B, L, d]``. The call still goes through the outermost wrapper (DDP,
FSDP, PEFT), so gradient synchronisation is untouched.

The other loss backends (``chunked``, ``cce``, ``liger``; :mod:`forgetful.nll_backends`) replace the
head's forward while the model runs (:func:`head_loss_on`): the head, called by the model as usual,
gathers the scored hidden states and returns their NLL instead of logits. The head weight is so
used inside the wrapped module's forward (FSDP has it unsharded there and reduces its gradient) and
no ``[N, vocab]`` logits are ever made at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ForgetfulError
from .nll_backends import IGNORE_INDEX, check_loss_backend, head_spec, resolve_loss_backend
from .nll_kernels import linear_nll

# Rows without padding whose position ids have gaps (compressed inputs) are plain causal sequences.
# transformers, given position ids with gaps and no attention mask, would read the gaps as
# boundaries of packed sequences; given an all-ones mask, it builds a full mask under
# torch.compile and SDPA loses its flash kernel. This attention implementation is SDPA with
# is_causal and no mask: transformers builds no mask for an implementation it does not know.
UNPADDED_CAUSAL = "forgetful_unpadded_causal"
_SWAPPABLE = ("sdpa", "eager")  # implementations whose result this one reproduces


def _unpadded_causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def _register_unpadded_causal() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(UNPADDED_CAUSAL, _unpadded_causal_sdpa)


_register_unpadded_causal()


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """While active, ``model`` computes attention with the registered implementation ``name``."""
    config = unwrap_model(model).config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def unpadded_causal_attention(model: nn.Module, input_ids: torch.Tensor) -> Iterator[torch.Tensor | None]:
    """While active, ``model`` reads its rows as unpadded causal sequences, whatever their position
    ids; yields the attention mask to pass (None, or an all-ones mask for an attention
    implementation that cannot be swapped)."""
    config = getattr(unwrap_model(model), "config", None)
    if getattr(config, "_attn_implementation", None) not in _SWAPPABLE:
        yield torch.ones_like(input_ids)
        return
    with attention_implementation(model, UNPADDED_CAUSAL):
        yield None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP/compile wrappers (PEFT models keep their own forward)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_loss_backend(name: str, model: nn.Module, device: torch.device | str) -> str:
    """The backend ``name`` means for ``model``'s LM head on ``device`` (``auto`` made concrete as
    for rows scored beyond their last tokens): what results record beside the option."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    if head is None or name != "auto":
        return "dense" if name == "auto" else name
    return resolve_loss_backend(name, device, head=head_spec(head, config=inner.config))


def output_embedding(model: nn.Module) -> nn.Module:
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ForgetfulError(
            f"{type(inner).__name__} has no output embedding (LM head); sparse logits need a causal LM "
            "with get_output_embeddings(), or set sparse_logits=False"
        )
    return head


@contextlib.contextmanager
def lm_head_on(model: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, the LM head only sees hidden states where ``positions`` ([B, L] bool) is
    True, flattened in row-major order to ``[1, N, d]``."""
    head = output_embedding(model)

    def pre_hook(module, args, kwargs):
        hidden = args[0]
        if hidden.shape[:2] != positions.shape:
            raise ForgetfulError(
                f"the LM head received hidden states of shape {tuple(hidden.shape)}, not [batch, length] = "
                f"{tuple(positions.shape)}; this model computes its head in an unusual way: set sparse_logits=False"
            )
        return (hidden[positions].unsqueeze(0), *args[1:]), kwargs

    handle = head.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _HeadLoss:
    """What the replaced head forward returned, one entry per call."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []

    @property
    def nll(self) -> torch.Tensor:
        if len(self.outputs) != 1:
            raise ForgetfulError(
                f"the LM head was called {len(self.outputs)} times in one forward; this model computes its head in an "
                "unusual way: use loss_backend='dense'"
            )
        return self.outputs[0].reshape(-1)


@contextlib.contextmanager
def head_loss_on(
    model: nn.Module,
    select: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    backend: str,
    summed: bool = False,
) -> Iterator[_HeadLoss]:
    """Within the block, the model's LM head computes the per-token NLL of ``targets`` from the
    hidden states ``select(hidden)`` (``[N, d]``) with ``backend`` and returns it (as
    ``[1, N, 1]``) in place of logits. The head module is still called by the model, so wrappers
    around it keep working (an FSDP-wrapped head: its wrapped module's forward is replaced, and the
    wrapper all-gathers the weight first)."""
    head = output_embedding(model)
    module = getattr(head, "_fsdp_wrapped_module", head)
    config = getattr(unwrap_model(model), "config", None)
    own = module.__dict__.get("forward")
    original = module.forward
    result = _HeadLoss()

    def forward(hidden, *args, **kwargs):
        h = select(hidden)
        if h.shape[0] != targets.shape[0]:
            raise ForgetfulError(
                f"the LM head got {h.shape[0]} scored positions for {targets.shape[0]} labels: use loss_backend='dense'"
            )
        spec = head_spec(module, lambda x: original(x, *args, **kwargs), config)
        nll = linear_nll(h, targets, spec, backend, summed=summed)
        out = nll.view(1, nll.shape[0], 1)
        result.outputs.append(out)
        return out

    module.forward = forward
    try:
        yield result
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


@dataclass
class TokenNLL:
    """Per-token NLL of the scored tokens, in row-major order, and the row of each."""

    nll: torch.Tensor  # [N] float32, connected to the graph
    rows: torch.Tensor  # [N] long
    batch_size: int

    def sum_per_row(self) -> torch.Tensor:
        return torch.zeros(self.batch_size, dtype=self.nll.dtype, device=self.nll.device).index_add(
            0, self.rows, self.nll
        )

    def count_per_row(self) -> torch.Tensor:
        return torch.bincount(self.rows, minlength=self.batch_size)

    def mean(self) -> torch.Tensor:
        """The mean NLL over every scored token of the batch (a zero still connected to the graph
        when there is none): the HF model loss."""
        return self.nll.sum() / max(self.nll.numel(), 1)

    def mean_per_row(self) -> torch.Tensor:
        """Each row's mean NLL over its scored tokens (0 for a row with none)."""
        return self.sum_per_row() / self.count_per_row().clamp(min=1)


def prediction_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: position ``t`` predicts ``labels[t + 1]`` (HF convention: labels unshifted)."""
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return pos


def _forward(model: nn.Module, input_ids, attention_mask, position_ids, **extra):
    """The model's forward without a cache. Position ids without an attention mask mean unpadded
    rows (compressed inputs): read them as causal sequences (see :func:`unpadded_causal_attention`)."""
    kwargs = {"input_ids": input_ids, "use_cache": False, **extra}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if attention_mask is not None or position_ids is None:
        return model(**kwargs, attention_mask=attention_mask)
    with unpadded_causal_attention(model, input_ids) as mask:
        return model(**kwargs, attention_mask=mask)


def token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sparse_logits: bool = True,
    target_length: int | None = None,
    loss_backend: str = "dense",
    summed: bool = False,
) -> TokenNLL:
    """NLL of every token whose label is not -100 (labels as HF causal LMs take them: unshifted,
    token ``t`` predicted from position ``t - 1``). Logits are computed only at the predicting
    positions when ``sparse_logits``; otherwise the full logits are gathered (same values).

    ``position_ids`` without an ``attention_mask`` declares rows without padding (as
    :func:`~forgetful.input.compression.compress_examples` returns them): they are read as causal
    sequences at those positions, gaps and all. ``target_length=m`` declares that the labels are
    exactly the last ``m`` tokens of every row (no padding after them): the model's own
    ``logits_to_keep`` then does the selection, with no data-dependent indexing (no host
    synchronisation).

    ``loss_backend`` (:mod:`forgetful.nll_backends`): ``dense`` computes the scored logits at once
    through the model's own head; ``chunked``, ``cce`` and ``liger`` compute the head and the
    cross-entropy together without ``[N, vocab]`` logits; ``auto`` picks one. ``sparse_logits=False``
    (full logits) is a ``dense`` (or ``auto``) option. ``summed``: the caller reduces the NLL with
    one weight for every token (a sum or a mean): a speed hint for ``chunked`` and ``liger``
    (:func:`~forgetful.nll_backends.linear_nll`)."""
    check_loss_backend(loss_backend, input_ids.device)
    if target_length is not None and sparse_logits:
        loss_backend = resolve_loss_backend(loss_backend, input_ids.device, targets_at_end=True)
    if loss_backend == "dense" or not sparse_logits:
        if loss_backend not in ("dense", "auto"):
            raise ForgetfulError(
                f"sparse_logits=False computes the full logits, which loss_backend='{loss_backend}' never does: "
                "use loss_backend='dense' (or auto), or sparse_logits=True"
            )
        return _dense_token_nll(model, input_ids, labels, attention_mask, position_ids, sparse_logits, target_length)
    batch = labels.shape[0]
    extra = {}
    if target_length is not None:
        m = target_length
        targets = labels[:, -m:].reshape(-1)
        rows = torch.arange(batch, device=labels.device).repeat_interleave(m)
        extra["logits_to_keep"] = m + 1

        def select(hidden: torch.Tensor) -> torch.Tensor:
            if hidden.shape[:2] != (batch, m + 1):
                raise ForgetfulError(
                    f"the LM head received hidden states of shape {tuple(hidden.shape)}, not [batch, m + 1] = "
                    f"{(batch, m + 1)}; this model ignores logits_to_keep: use loss_backend='dense'"
                )
            return hidden[:, :-1].reshape(-1, hidden.shape[-1])

    else:
        positions = prediction_positions(labels)
        targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        rows = positions.nonzero()[:, 0]

        def select(hidden: torch.Tensor) -> torch.Tensor:
            if hidden.shape[:2] != positions.shape:
                raise ForgetfulError(
                    f"the LM head received hidden states of shape {tuple(hidden.shape)}, not [batch, length] = "
                    f"{tuple(positions.shape)}; this model computes its head in an unusual way: use loss_backend='dense'"
                )
            return hidden[positions]

    with head_loss_on(model, select, targets, loss_backend, summed) as head:
        _forward(model, input_ids, attention_mask, position_ids, **extra)
    return TokenNLL(head.nll, rows, batch)


def _dense_token_nll(model, input_ids, labels, attention_mask, position_ids, sparse_logits, target_length) -> TokenNLL:
    if target_length is not None and sparse_logits:
        logits = _forward(model, input_ids, attention_mask, position_ids, logits_to_keep=target_length + 1).logits
        logits = logits[:, :-1]
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels[:, -target_length:].reshape(-1), reduction="none"
        )
        rows = torch.arange(labels.shape[0], device=labels.device).repeat_interleave(target_length)
        return TokenNLL(nll, rows, labels.shape[0])
    positions = prediction_positions(labels)
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    if sparse_logits:
        with lm_head_on(model, positions):
            logits = _forward(model, input_ids, attention_mask, position_ids).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        logits = _forward(model, input_ids, attention_mask, position_ids).logits[positions]
    if logits.shape[0] != targets.shape[0]:
        raise ForgetfulError(
            f"the model returned {logits.shape[0]} scored logits for {targets.shape[0]} labels; set sparse_logits=False"
        )
    # With nothing to score, ``nll`` is empty but still has a grad_fn: its sum is a zero connected
    # to every parameter, so backward gives zero gradients (no NaN, no DDP hang).
    nll = F.cross_entropy(logits.float(), targets, reduction="none")
    return TokenNLL(nll, positions.nonzero()[:, 0], labels.shape[0])
