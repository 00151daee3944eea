"""Token-level rules that every part of the library shares, each written once.

* Special tokens: a sequence the model reads starts with BOS and, where it is trained or scored to
  its end, finishes with EOS (when the tokenizer has them). Text is always encoded without the
  tokenizer's own special tokens, and these are added here.
* The pad id: the tokenizer's pad token, else the model config's, else EOS, else 0.
* Right padding of integer sequences into a batch.
* A prompt followed by its answer: BOS + prompt, then ``" " + answer`` + EOS, encoded apart so the
  boundary between prompt and answer is a token boundary (:func:`encode_prompt_answer`, the
  ``completion`` task). TOFU is the exception: it encodes as open-unlearning does, whose code
  defines the benchmark (:func:`forgetful.data.tofu.encode_qa`, shared by TOFU training and
  evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def bos_ids(tokenizer) -> list[int]:
    """``[BOS]`` when the tokenizer has one, else ``[]``."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def eos_ids(tokenizer) -> list[int]:
    """``[EOS]`` when the tokenizer has one, else ``[]``."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def with_special_tokens(tokenizer, ids: Sequence[int], *, bos: bool = True, eos: bool = True) -> list[int]:
    """``ids`` with BOS before (``bos``) and EOS after (``eos``), where the tokenizer has them."""
    return (bos_ids(tokenizer) if bos else []) + list(ids) + (eos_ids(tokenizer) if eos else [])


def encode_text(tokenizer, texts: str | list[str], *, offsets: bool = False):
    """Token ids of ``texts`` without the tokenizer's own special tokens (a list of ids for one
    text, a list of lists for several); with ``offsets``, the tokenizer's full encoding with
    ``offset_mapping``."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return enc if offsets else enc["input_ids"]


def pad_token_id(tokenizer=None, model=None) -> int:
    """The id to pad with: the tokenizer's pad token, else the model config's, else EOS, else 0.
    (Padding is always masked out, so any id works; the order only keeps files reproducible.)"""
    candidates = [
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(model, "config", None), "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ]
    return int(next((c for c in candidates if c is not None), 0))


def pad_sequences(
    seqs: Sequence[Sequence[int]], value: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad integer sequences to one width; returns (padded ``[B, W]``, mask of real tokens)."""
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max()) if width is None else width
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    mask = torch.arange(out.shape[1])[None, :] < lengths[:, None]
    out[mask] = flat
    return out, mask


@dataclass(frozen=True)
class PromptAnswer:
    """A prompt and its answer as one token sequence."""

    ids: list[int]  # BOS + prompt + answer + EOS, truncated to max_length
    prompt_length: int  # tokens before the first answer token
    offsets: list[tuple[int, int]]  # character span of each answer token (and EOS) in answer_text
    answer_text: str  # " " + answer: the text the answer tokens encode


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """BOS + ``prompt``: what a model reads before it answers (and generates from)."""
    return bos_ids(tokenizer) + encode_text(tokenizer, prompt)


def encode_prompt_answer(tokenizer, prompt: str, answer: str, max_length: int | None = None) -> PromptAnswer:
    """BOS + ``prompt``, then ``" " + answer`` and EOS, truncated on the right to ``max_length``."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_text = " " + answer
    enc = encode_text(tokenizer, answer_text, offsets=True)
    eos = eos_ids(tokenizer)
    ids = prompt_ids + enc["input_ids"] + eos
    if max_length is not None:
        ids = ids[:max_length]
    offsets = [tuple(o) for o in enc["offset_mapping"]] + [(len(answer_text), len(answer_text))] * len(eos)
    return PromptAnswer(ids, min(len(prompt_ids), len(ids)), offsets, answer_text)


def overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Bool per token: its character offsets ``(start, end)`` overlap one of ``spans``. Empty
    spans cover no character."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    sp = sp[sp[:, 1] > sp[:, 0]]
    if len(off) == 0 or len(sp) == 0:
        return np.zeros(len(off), dtype=bool)
    return ((off[:, None, 0] < sp[None, :, 1]) & (sp[None, :, 0] < off[:, None, 1])).any(axis=1)
