"""Forgetting at depth, and a keep that is not 0/1: two ways of changing which context keys the
LM's layers read, beside :func:`~forgetful.input.compression.apply_mask`.

* **At depth** (``forget_layer`` L, :func:`drop_after_layer`): layers ``1..L`` read the whole row;
  after layer ``L`` only the kept tokens' states (at their original positions) and the target go on,
  physically shortened, so layers ``L+1..N`` cost O(b²) like input forgetting. What layers ``1..L``
  merged into the kept tokens survives (GemFilter, DMS, Random-LTD drop inside the network).
  ``L = 0`` is input forgetting; ``L = N`` keeps every token up to the final norm (the identity).
* **A bias** (:func:`~forgetful.input.compression.biased_examples`): ``log keep`` added to the attention logits of every context key in
  layers ``L+1..N``; a relaxed keep in (0, 1) gives every context token a gradient from the target
  NLL (:mod:`~forgetful.input.learners.relaxed`). At a hard 0/1 keep it equals the shortened forward.

Both run through one attention implementation of ours (registered with transformers, like the
attention-score recorder): it builds each layer's mask itself from the row's real keys (before or
after the drop), so padded rows, the drop and the bias need nothing from the model's own masking.
The layers' positional inputs (rotary ``position_embeddings``, ``position_ids``) are gathered with
the hidden states by forward hooks, so any decoder whose layers take them works (Llama, Qwen,
Mistral, GPT-2, ...).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ForgetfulError
from ..models.layers import decoder_stack, num_layers
from ..nll import attention_implementation, unwrap_model

MASKED_ATTENTION = "forgetful_masked_keys"
# the bias of a forgotten key: exp() of it is 0 in float32 and bfloat16, and it stays finite (a row
# whose every key is forgotten gets a uniform softmax, never NaN)
FORGOTTEN = -1e4


@dataclass
class DepthPlan:
    """What one forward does to its rows ``[B, T]`` (packed: real tokens first, right-padded).

    ``layer``: layers ``0..layer-1`` read every real key; from layer ``layer`` on, either only the
    ``index`` columns go on (``[B, S]``, ``short_valid`` marks real ones) or ``bias`` (``[B, T]``,
    log-keep) is added to every key's attention logit."""

    layer: int
    full_valid: torch.Tensor | None = None  # [B, T] bool, None: every token is real
    index: torch.Tensor | None = None  # [B, S] long: the columns kept after ``layer``
    short_valid: torch.Tensor | None = None  # [B, S] bool, None: every kept slot is real
    bias: torch.Tensor | None = None  # [B, T] float: log-keep added to keys from ``layer`` on


_ACTIVE: list[DepthPlan] = []


def _mask(valid: torch.Tensor | None, bias: torch.Tensor | None, q: int, k: int, like: torch.Tensor):
    """``[B, 1, q, k]`` additive mask: causal (the last ``q`` of ``k`` positions query), the keys
    that are not real, and ``bias``; None when plain causal attention does (SDPA's own kernel)."""
    if valid is None and bias is None:
        return None
    keys = torch.arange(k, device=like.device)
    queries = keys[k - q :]
    allowed = (keys.view(1, 1, 1, k) <= queries.view(1, 1, q, 1)).expand(like.shape[0], 1, q, k)
    if valid is not None:
        allowed = allowed & valid.view(-1, 1, 1, k)
    low = torch.finfo(like.dtype).min
    mask = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(~allowed, low)
    if bias is not None:
        mask = mask + bias.to(like.dtype).view(-1, 1, 1, k)
    return mask


def _masked_keys_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = _ACTIVE[-1]
    after = getattr(module, "layer_idx", 0) >= plan.layer
    if after and plan.index is not None:
        valid, bias = plan.short_valid, None
    else:
        valid, bias = plan.full_valid, plan.bias if after else None
    mask = _mask(valid, bias, query.shape[2], key.shape[2], query)
    if bias is not None and bias.requires_grad and query.is_cuda:
        # the fused kernels' backward of a mask that needs a gradient fails on CUDA ("LSE is not
        # correctly aligned", torch 2.11 on an H100): the math kernel computes it
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(MASKED_ATTENTION, _masked_keys_attention)


_register()


# decoders whose forward reshapes the last hidden states to the input's length (GPT-2 and its kin):
# a row shortened inside the stack cannot come out of them, so they drop at depth by masking the
# forgotten keys instead (the same result, without the saving)
RESHAPE_TO_INPUT = frozenset({"gpt2", "gpt_bigcode", "gpt_neo", "gptj", "codegen"})


def shortens_inside(model: nn.Module) -> bool:
    """Whether ``model``'s rows can be shortened between its layers (else :func:`depth_forward`
    masks the forgotten keys after the layer instead)."""
    return getattr(unwrap_model(model).config, "model_type", None) not in RESHAPE_TO_INPUT


def check_forget_layer(model: nn.Module, layer: int) -> int:
    total = num_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= total:
        raise ForgetfulError(f"forget_layer must lie in 0..{total} (this model's layers), got {layer!r}")
    return layer


def _gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b]]`` along dim 1 for ``t`` of shape ``[B or 1, T, ...]``."""
    t = t.expand(index.shape[0], *t.shape[1:])
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:]))


def _bind(layer: nn.Module):
    signature = inspect.signature(layer.forward)

    def bound(args, kwargs):
        return signature.bind_partial(*args, **kwargs)

    return bound


@contextlib.contextmanager
def _drop_hooks(model: nn.Module, plan: DepthPlan) -> Iterator[None]:
    """Forward hooks that shorten the hidden states after layer ``plan.layer - 1`` and gather the
    positional inputs of every later layer."""
    base, name = decoder_stack(model)
    layers = list(getattr(base, name))
    handles = []
    index = plan.index

    def shorten(module, args, output):
        if isinstance(output, tuple):
            return (_gather_rows(output[0], index), *output[1:])
        return _gather_rows(output, index)

    def positions(bind):
        def hook(module, args, kwargs):
            call = bind(args, kwargs)
            for key in ("position_embeddings", "position_ids"):
                value = call.arguments.get(key)
                if isinstance(value, tuple):
                    call.arguments[key] = tuple(_gather_rows(v, index) for v in value)
                elif isinstance(value, torch.Tensor) and value.dim() >= 2:
                    call.arguments[key] = _gather_rows(value, index)
            return call.args, call.kwargs

        return hook

    handles.append(layers[plan.layer - 1].register_forward_hook(shorten))
    for layer in layers[plan.layer :]:
        handles.append(layer.register_forward_pre_hook(positions(_bind(layer)), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def depth_forward(model: nn.Module, plan: DepthPlan) -> Iterator[None]:
    """While active, ``model``'s forward follows ``plan``: rows packed (no padding between context
    and target), each layer's mask built from ``plan`` (pass no attention mask to the model), the
    kept columns gathered after layer ``plan.layer`` when ``plan.index`` is set, else ``plan.bias``
    added to the keys of the later layers."""
    check_forget_layer(model, plan.layer)
    if plan.index is not None and plan.layer == 0:
        raise ForgetfulError("forget_layer 0 is input forgetting: gather the kept tokens before the model (apply_mask)")
    _ACTIVE.append(plan)
    try:
        with attention_implementation(model, MASKED_ATTENTION), contextlib.ExitStack() as stack:
            if plan.index is not None:
                stack.enter_context(_drop_hooks(model, plan))
            yield
    finally:
        _ACTIVE.pop()
