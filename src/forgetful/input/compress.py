"""Compress a prompt and generate from it: the user's path from a strategy (or a trained policy) to
a shorter context.

>>> short = compress(model, tokenizer, passage, keep_ratio=0.25, strategy="lexical@sentence", question=q)
>>> short.text, short.kept, short.length          # what is left, and how much
>>> answer = generate(model, tokenizer, short, max_new_tokens=32)

``compress`` builds the prompt (with the question after the passage, through the chat template when
the tokenizer has one, the question protected: always kept, outside the budget), picks the keep set
with the strategy at the exact budget (the strategy grammar, ``name[:key=value,...][@unit]``, a saved
policy's folder, or a :class:`~forgetful.input.policies.ForgetMask` such as a trained policy), and
returns the kept tokens with their original positions. ``generate`` decodes greedily from them with a
KV cache, the new tokens continuing the original positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ForgetfulError
from ..tokens import encode_text, pad_token_id, with_special_tokens
from .compression import apply_mask
from .evaluation import choose_keep
from .examples import ForgetBatch, encode_passage_question
from .policies import ForgetMask, build_mask
from .units import sentence_end_table, sentence_ids


@dataclass
class CompressedPrompt:
    """A prompt after forgetting: the kept ``input_ids`` ``[1, b]`` at their original
    ``position_ids``, the ``keep`` mask over the whole prompt ``[1, n]``, the kept ``text``, and
    ``next_position`` (the prompt's length: where an answer starts)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    keep: torch.Tensor
    text: str
    next_position: int
    strategy: str

    @property
    def kept(self) -> float:
        """The share of the prompt kept (the question included)."""
        return float(self.keep.float().mean())

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def prompt_batch(tokenizer, text: str, question: str | None = None) -> ForgetBatch:
    """One row: ``text`` (then the ``question``, protected, as the TOFU-QA task builds it), with BOS
    first and the sentence ids of its tokens."""
    if question is None:
        ids = with_special_tokens(tokenizer, encode_text(tokenizer, text), eos=False)
        protect = None
    else:
        ids, offsets, start = encode_passage_question(tokenizer, text, question)
        inside = [s < start + len(text) and e > start for s, e in offsets]
        protect = torch.tensor([[not x for x in inside]])
        protect[0, 0] = False  # the first token is kept anyway (keep_first)
    if len(ids) < 2:
        raise ForgetfulError("the text to compress is empty: give a passage of at least one token")
    row = torch.tensor([ids])
    sentences = torch.from_numpy(sentence_ids(ids, sentence_end_table(tokenizer))).unsqueeze(0)
    ones = torch.ones_like(row, dtype=torch.bool)
    return ForgetBatch(row, ones, row[:, -1:], ones[:, -1:], protect_mask=protect, sentence_ids=sentences)


@torch.no_grad()
def compress(
    model: nn.Module,
    tokenizer,
    text: str,
    *,
    keep_ratio: float,
    strategy: str | ForgetMask = "recency@sentence",
    question: str | None = None,
) -> CompressedPrompt:
    """Keep ``keep_ratio`` of ``text``'s tokens (exactly; token 0 and the ``question`` always kept)
    as ``strategy`` chooses them; see the module docstring."""
    if not 0 < keep_ratio <= 1:
        raise ForgetfulError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
    mask = strategy if isinstance(strategy, ForgetMask) else build_mask(strategy, model)
    if mask.reads_target:
        raise ForgetfulError("the oracle reads a target that a prompt does not have: choose another strategy")
    device = next(model.parameters()).device
    batch = prompt_batch(tokenizer, text, question).to(device)
    keep = choose_keep(mask.to(device), batch, keep_ratio=keep_ratio) & batch.context_mask
    short = apply_mask(batch.context_ids, keep)
    kept_text = tokenizer.decode(short.input_ids[0], skip_special_tokens=True)
    return CompressedPrompt(
        short.input_ids, short.position_ids, keep, kept_text, int(batch.context_ids.shape[1]), mask.strategy
    )


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: CompressedPrompt, *, max_new_tokens: int = 64, autocast=None) -> str:
    """Greedy text after the compressed ``prompt`` (at most ``max_new_tokens`` tokens, up to EOS)."""
    from .generation import greedy_generate

    if max_new_tokens < 1:
        raise ForgetfulError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    with (autocast or contextlib.nullcontext)():
        new = greedy_generate(
            model,
            prompt.input_ids.to(device),
            torch.ones_like(prompt.input_ids, device=device),
            prompt.position_ids.to(device),
            torch.tensor([prompt.next_position], device=device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_token_id(tokenizer, model),
        )
    model.train(was)
    return tokenizer.decode(new[0], skip_special_tokens=True).strip()
