"""Reading a causal LM part-way: its stack of decoder layers, a forward pass through the first few of
them only (what an early-layer policy or scorer pays, what RMU steers), and the hidden states there."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ForgetfulError
from ..nll import unwrap_model

_LAYER_LISTS = ("layers", "h")  # Llama, Mistral, Qwen, Gemma, GPT-NeoX: layers; GPT-2, GPT-J: h


def decoder_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """The base model (embeddings and decoder layers, no LM head) and the name of its layer list."""
    base = unwrap_model(model)
    base = getattr(base, "base_model", base)
    for name in _LAYER_LISTS:
        if isinstance(getattr(base, name, None), nn.ModuleList):
            return base, name
    raise ForgetfulError(f"{type(base).__name__} has no list of decoder layers ({' or '.join(_LAYER_LISTS)})")


def num_layers(model: nn.Module) -> int:
    base, name = decoder_stack(model)
    return len(getattr(base, name))


@contextlib.contextmanager
def first_layers(model: nn.Module, count: int) -> Iterator[nn.Module]:
    """While active, the base model runs only its first ``count`` decoder layers; yields it."""
    base, name = decoder_stack(model)
    layers = getattr(base, name)
    if not 1 <= count <= len(layers):
        raise ForgetfulError(f"layer must lie in 1..{len(layers)}, got {count}")
    setattr(base, name, nn.ModuleList(list(layers)[:count]))
    try:
        yield base
    finally:
        setattr(base, name, layers)


@torch.no_grad()
def early_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int):
    """The hidden states ``[B, n, d]`` after the first ``layer`` decoder layers (before the final
    norm), from a forward pass that runs those layers only. Rows are right-padded."""
    captured = {}
    with first_layers(model, layer) as base:
        last = getattr(base, decoder_stack(model)[1])[layer - 1]

        def grab(module, args, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output

        handle = last.register_forward_hook(grab)
        try:
            base(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False)
        finally:
            handle.remove()
    return captured["h"]


def layer_output(
    model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The output ``[B, n, d]`` of decoder layer ``layer`` (0-based: the residual stream after it,
    before any final norm), with gradients unless the caller turns them off. The call goes through
    ``model``'s own forward, so its wrappers (DDP, FSDP) see it, with the stack cut after that
    layer: the later layers never run and the LM head sees one position (``logits_to_keep=1``)
    when the model takes that option."""
    captured: list[torch.Tensor] = []
    with first_layers(model, layer + 1) as base:
        module = getattr(base, decoder_stack(model)[1])[layer]

        def grab(mod, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters:
            kwargs["logits_to_keep"] = 1
        handle = module.register_forward_hook(grab)
        try:
            model(**kwargs)
        finally:
            handle.remove()
    return captured[0]
