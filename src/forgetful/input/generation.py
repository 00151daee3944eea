"""Greedy generation from compressed context: the kept tokens at their original positions, a KV
cache, left-padded prompts (:func:`greedy_generate`), and the answers of a batch of question rows
(:func:`generate_answers`, the ROUGE of TOFU-QA)."""

from __future__ import annotations

import torch
from torch import nn

from ..nll import unwrap_model
from ..tokens import pad_token_id as pad_id_of
from .compression import apply_mask
from .examples import ForgetBatch


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    next_positions: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
) -> torch.Tensor:
    """Greedy decoding with a KV cache from left-padded prompts whose tokens sit at ``position_ids``
    (a compressed prompt keeps its original positions); the answer's first token is at
    ``next_positions``. Returns ``[B, T]`` new tokens, ``pad_token_id`` after a row's EOS."""
    from transformers import DynamicCache

    cache = DynamicCache(config=unwrap_model(model).config)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    )
    positions, mask = next_positions.clone(), attention_mask
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new = []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1).masked_fill(done, pad_token_id)
        new.append(token)
        if eos_token_id is not None:
            done |= token == eos_token_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        positions += 1
    return torch.stack(new, 1) if new else input_ids.new_zeros(input_ids.shape[0], 0)


def generate_answers(
    model: nn.Module, tokenizer, batch: ForgetBatch, keep: torch.Tensor, *, max_new_tokens: int
) -> list[str]:
    """Greedy answers from each row's kept context tokens, at their original positions."""
    pad = pad_id_of(tokenizer, model)
    short = apply_mask(batch.context_ids, keep & batch.context_mask, pad_token_id=pad)
    # right padding -> left padding: shift each row by its padding, so every prompt ends at one column
    width = short.input_ids.shape[1]
    source = torch.arange(width, device=keep.device).unsqueeze(0) - (width - short.lengths).unsqueeze(1)
    real, pick = source >= 0, source.clamp(min=0)
    ids = short.input_ids.gather(1, pick).masked_fill(~real, pad)
    positions = short.position_ids.gather(1, pick).masked_fill(~real, 0)
    new = greedy_generate(
        model,
        ids,
        real.long(),
        positions,
        batch.context_mask.sum(-1),
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
    )
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
