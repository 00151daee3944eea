"""Batched scoring and generation of TOFU answers, as open-unlearning computes them: the mean NLL
of the scored answer tokens with their Min-K% and extraction strength (:func:`score_answers`), greedy
generation from left-padded prompts (:func:`generate_answers`), and the references generations are
compared with (:func:`references`, decoded as open-unlearning decodes them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.tofu import DEFAULT_MAX_LENGTH, TofuTemplate, encode_qa, encode_question
from ..nll import IGNORE_INDEX, lm_head_on, prediction_positions
from ..tokens import pad_sequences, pad_token_id
from .metrics import MIN_K

# --------------------------------------------------------------------------------------------
# Batched scoring and generation
# --------------------------------------------------------------------------------------------


@dataclass
class AnswerScores:
    """Per example: mean NLL of the scored tokens, Min-K% score and extraction strength (both
    over the scored tokens but the last)."""

    nll: np.ndarray
    min_k: np.ndarray
    extraction: np.ndarray


@torch.no_grad()
def score_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    template: TofuTemplate | None = None,
    batch_size: int = 32,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    k: float = MIN_K,
) -> AnswerScores:
    """Score every answer given its question in one forward pass per batch (right padding, in
    input order): the vocabulary logits are computed only at the positions that predict a scored
    token."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer, model)
    encoded = [encode_qa(tokenizer, q, a, max_length, template) for q, a in zip(questions, answers)]
    n = len(encoded)
    nll, mink, es = np.zeros(n), np.zeros(n), np.zeros(n)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, n, batch_size):
            batch = encoded[i : i + batch_size]
            ids, real = pad_sequences([e.ids for e in batch], pad)
            attn, _ = pad_sequences([e.attention_mask for e in batch], 0)
            starts = torch.tensor([e.prompt_length for e in batch])
            labels = ids.masked_fill(~real, IGNORE_INDEX)
            labels = labels.masked_fill(torch.arange(ids.shape[1])[None] < starts[:, None], IGNORE_INDEX)
            ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
            positions = prediction_positions(labels)
            with lm_head_on(model, positions):
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
            targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
            token_lp = logp.gather(1, targets[:, None])[:, 0]
            rows = positions.nonzero()[:, 0]  # row-major, as the logits and targets
            scores = row_scores(token_lp, logp.argmax(-1) == targets, rows, len(batch), k)
            for out, values in zip((nll, mink, es), scores):
                out[i : i + len(batch)] = values.cpu().numpy()
    finally:
        model.train(was_training)
    return AnswerScores(nll, mink, es)


def row_scores(
    token_logprobs: torch.Tensor, correct: torch.Tensor, rows: torch.Tensor, n_rows: int, k: float = MIN_K
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, from its scored tokens given flat in row-major order (``rows``: each token's row,
    ascending; ``correct``: whether the greedy prediction of the token was it): the mean NLL (NaN
    for a row without tokens), and over every token but the last, the Min-K% score
    (:func:`~.metrics.min_k_score`) and the extraction strength
    (:func:`~.metrics.extraction_strength`). Float64, on the tokens' device, no loop over rows."""
    device = token_logprobs.device
    counts = torch.bincount(rows, minlength=n_rows)
    lp = token_logprobs.double()
    nll = -torch.zeros(n_rows, dtype=torch.float64, device=device).index_add_(0, rows, lp) / counts
    nll = nll.masked_fill(counts == 0, float("nan"))
    # every row's tokens in a row of a padded [rows, longest] table
    first = torch.cumsum(counts, 0) - counts
    column = torch.arange(len(rows), device=device) - first[rows]
    width = int(counts.max()) if len(rows) else 0
    n = (counts - 1).clamp(min=0)  # the tokens but the last
    inside = torch.arange(width, device=device)[None] < n[:, None]
    table = torch.full((n_rows, width), float("inf"), dtype=torch.float64, device=device)
    table[rows, column] = lp
    lowest = table.masked_fill(~inside, float("inf")).sort(dim=1).values
    # k as open-unlearning takes it: max(1, int(k * n)) lowest log-probabilities; 0 for no tokens
    num_k = torch.floor(n.double() * k).long().clamp(min=1)
    low = torch.arange(width, device=device)[None] < num_k[:, None]
    min_k = torch.where(n > 0, -lowest.masked_fill(~low, 0).sum(1) / num_k, 0.0)
    # extraction strength: k = n - (the length of the run of correct predictions that ends the row), n - 1
    # when the last is wrong; padding counts as correct, so it never breaks a run that ends the row
    right = torch.ones((n_rows, width), dtype=torch.bool, device=device)
    right[rows, column] = correct
    right |= ~inside  # the last token, left out, counts as correct too
    ending_run = right.flip(1).long().cumprod(1).sum(1) - (width - n)
    start = torch.where(ending_run > 0, n - ending_run, n - 1)
    extraction = torch.where(n > 0, 1.0 - start.double() / n.clamp(min=1), 0.0)
    return nll, min_k, extraction


def answer_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    template: TofuTemplate | None = None,
) -> np.ndarray:
    """Mean NLL of the scored tokens of each answer (:func:`~forgetful.data.tofu.encode_qa`)."""
    return score_answers(
        model, tokenizer, questions, answers, template=template, batch_size=batch_size, max_length=max_length
    ).nll


def clean_up_tokenization(text: str) -> str:
    """transformers 4's ``clean_up_tokenization_spaces`` (transformers 5 no longer applies it to
    BPE tokenizers; open-unlearning decodes with it)."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def decode(tokenizer, ids) -> str:
    """Text of ``ids`` without special tokens, cleaned up as open-unlearning decodes."""
    return clean_up_tokenization(tokenizer.decode(list(ids), skip_special_tokens=True))


def _eos_for_generation(model, tokenizer):
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return eos if eos is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int = 200,
    batch_size: int = 32,
    *,
    template: TofuTemplate | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
) -> list[str]:
    """Greedy answers to the prompts of :func:`~forgetful.data.tofu.encode_question`, batched in
    input order with left padding and the attention mask ``token != pad`` (generation positions
    count only attended tokens), stopped at the model's EOS; decoded without special tokens,
    cleaned up, cut at the EOS text and stripped."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer, model)
    prompts = [encode_question(tokenizer, q, max_length, template) for q in questions]
    eos_text = tokenizer.decode([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else ""
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            # left padding, so every prompt ends where generation starts: right-pad the reversed prompts
            ids, _ = pad_sequences([p[::-1] for p in batch], pad)
            ids = ids.flip(1)
            width = ids.shape[1]
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=ids.ne(pad).long().to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                top_p=None,
                temperature=None,
                use_cache=True,
                pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad,
                eos_token_id=_eos_for_generation(model, tokenizer),
            )
            for row in gen[:, width:].cpu().tolist():
                text = decode(tokenizer, row)
                if eos_text and eos_text in text:
                    text = text.split(eos_text)[0]
                out.append(text.strip())
    finally:
        model.train(was_training)
    return out


def references(
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    template: TofuTemplate | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    with_prompts: bool = False,
):
    """The ROUGE reference of each answer: the decoded full sequence with the decoded prompt
    removed (every occurrence), stripped; with ``with_prompts``, also the decoded prompts."""
    refs, prompts = [], []
    for q, a in zip(questions, answers):
        full = decode(tokenizer, encode_qa(tokenizer, q, a, max_length, template).ids)
        prompt = decode(tokenizer, encode_question(tokenizer, q, max_length, template))
        refs.append(full.replace(prompt, "").strip())
        prompts.append(prompt)
    return (refs, prompts) if with_prompts else refs
