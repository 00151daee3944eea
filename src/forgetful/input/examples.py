"""Input-forgetting examples and their batches.

An example is a (context, target) pair of token lists: a window cut from a token stream (context
``n`` tokens, target the next ``m``), or a question-answer example whose context is a passage plus
a question and whose target is the answer. Only the context can be compressed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..data.embedded import biography_examples
from ..data.multihop import MultihopOptions, multihop_rows
from ..data.sources import EMBEDDED, load_rows, load_text_corpus, text_windows, tokenize_stream
from ..errors import ForgetfulError
from ..tokens import bos_ids, encode_text, overlap_mask, pad_sequences, with_special_tokens
from .units import add_sentence_ids, unit_ids


def qa_examples(rows: Sequence[dict] | Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Question-answer examples: ``context`` (passage + question) and ``target`` (the answer,
    followed by EOS). Contexts start with BOS, the attention sink that policies always keep.
    Rows with ``fact_spans`` (character spans in the context) also get a token ``fact_mask``."""
    ctx_ids, tgt_ids, fact_masks = [], [], []
    has_spans = len(rows) > 0 and "fact_spans" in rows[0]
    n_bos = len(bos_ids(tokenizer))
    for row in rows:
        if not isinstance(row.get("context"), str) or not isinstance(row.get("target"), str):
            raise ForgetfulError("question-answer rows need string fields 'context' and 'target'")
        if not row["target"].strip() or not row["context"].strip():
            raise ForgetfulError(
                f"empty context or target in row with context {row['context'][:40]!r}: "
                "every example needs both (zero-length sequences cannot be scored)"
            )
        enc = encode_text(tokenizer, row["context"], offsets=True)
        ctx_ids.append(with_special_tokens(tokenizer, enc["input_ids"], eos=False))
        target = with_special_tokens(tokenizer, encode_text(tokenizer, row["target"]), bos=False)
        if not target:
            raise ForgetfulError(f"empty target in row with context {row['context'][:40]!r}")
        tgt_ids.append(target)
        if has_spans:
            facts = overlap_mask(enc["offset_mapping"], row["fact_spans"]).astype(np.int8).tolist()
            fact_masks.append([0] * n_bos + facts)
    cols = {"context_ids": ctx_ids, "target_ids": tgt_ids}
    if has_spans:
        cols["fact_mask"] = fact_masks
    return Dataset.from_dict(cols)


def embedded_qa_rows(n: int, seed: int, n_facts: int = 3, n_filler: int = 6) -> list[dict]:
    return [ex.as_dict() for ex in biography_examples(n, seed=seed, n_facts=n_facts, n_filler=n_filler)]


TOFU_QA_HELD_OUT = 20  # the last authors (forget10's): never in a training passage


def tofu_qa_examples(
    tokenizer: PreTrainedTokenizerBase,
    source: str | Path | None,
    *,
    part: str = "train",
    questions_per_author: int | None = None,
    distractor_authors: int = 10,
    answers_per_distractor: int = 2,
    seed: int = 0,
    num_authors: int = 200,
    held_out: int = TOFU_QA_HELD_OUT,
) -> Dataset:
    """Question answering over a passage, from TOFU: for each author, a passage of that author's
    answers in shuffled order mixed with answers of ``distractor_authors`` other authors
    (``answers_per_distractor`` each), then one of the author's questions; the target is its answer.
    Only the passage can be forgotten: the question (and the chat template around it) is protected.
    ``part="train"``: every author but the last ``held_out`` (20: forget10's; at most half);
    ``"eval"``: those, whose
    passages draw distractors from the held-out authors only, so no held-out answer ever reaches
    training. ``fact_mask`` marks the passage tokens of the answer asked about (a strategy that keeps
    them can copy the answer); ``unit_ids`` declares the task's units, one per answer in the passage
    (-1 outside it); ``group`` is the author asked about (the unit of the paired bootstrap);
    ``sentence_ids`` splits the prompt into sentences. Through the chat template when the tokenizer
    has one.
    """
    from ..data.tofu import load_tofu_split

    if part not in ("train", "eval"):
        raise ForgetfulError(f"TOFU-QA part must be train or eval, got '{part}'")
    rows = load_tofu_split(source, "full", num_authors=num_authors, seed=seed)
    per_author = 20
    authors = [rows[i : i + per_author] for i in range(0, len(rows), per_author)]
    if held_out < 1:
        raise ForgetfulError(f"TOFU-QA holds out at least one author, got held_out={held_out}")
    held = min(held_out, len(authors) // 2)
    pool = list(range(len(authors) - held)) if part == "train" else list(range(len(authors) - held, len(authors)))
    if len(pool) <= distractor_authors:
        raise ForgetfulError(
            f"TOFU-QA needs more than {distractor_authors} authors in the {part} part, has {len(pool)}"
        )
    rng = np.random.default_rng([seed, 0 if part == "train" else 1])
    ids_out, tgt_out, protect_out, fact_out, answers, units_out, groups = [], [], [], [], [], [], []
    for a in pool:
        asked = range(per_author) if questions_per_author is None else range(min(questions_per_author, per_author))
        for q in asked:
            others = rng.choice([o for o in pool if o != a], size=distractor_authors, replace=False)
            sentences = [r["answer"] for r in authors[a]]
            for o in others:
                picks = rng.choice(per_author, size=answers_per_distractor, replace=False)
                sentences += [authors[o][i]["answer"] for i in picks]
            order = rng.permutation(len(sentences))
            passage, start, span, spans = "", 0, None, []
            for j in order:
                if passage:
                    passage += " "
                start = len(passage)
                passage += sentences[j]
                spans.append((start, len(passage)))
                if j == q:  # the author's own answer to the question asked
                    span = (start, len(passage))
            enc = encode_passage_question(tokenizer, passage, authors[a][q]["question"])
            ids, offsets, passage_at = enc
            in_passage = overlap_mask(offsets, [(passage_at, passage_at + len(passage))])
            facts = overlap_mask(offsets, [(passage_at + span[0], passage_at + span[1])])
            units_out.append(_span_units(offsets, [(passage_at + s, passage_at + e) for s, e in spans]).tolist())
            groups.append(a)
            answer = authors[a][q]["answer"]
            ids_out.append(ids)
            protect_out.append((~in_passage).astype(np.int8).tolist())
            fact_out.append(facts.astype(np.int8).tolist())
            tgt_out.append(
                with_special_tokens(
                    tokenizer, encode_text(tokenizer, answer if tokenizer.chat_template else " " + answer), bos=False
                )
            )
            answers.append(answer)
    ds = Dataset.from_dict(
        {
            "context_ids": ids_out,
            "target_ids": tgt_out,
            "protect_mask": protect_out,
            "fact_mask": fact_out,
            "unit_ids": units_out,
            "group": groups,
            "answer": answers,
        }
    )
    return add_sentence_ids(ds, tokenizer)


def multihop_examples(
    tokenizer: PreTrainedTokenizerBase,
    *,
    part: str = "train",
    n: int | None = None,
    seed: int = 0,
    options: MultihopOptions | None = None,
) -> Dataset:
    """Multi-hop question answering over a passage (:mod:`forgetful.data.multihop`): the question
    names a book, the answer is an attribute of its author, and the author (the bridge) appears only
    in the passage, among distractor chains with the same relations. The columns of
    :func:`tofu_qa_examples`: ``context_ids`` (passage + question, through the chat template when the
    tokenizer has one), ``target_ids`` (the answer entity + EOS), ``protect_mask`` (1 outside the
    passage), ``fact_mask`` (1 on the two hop sentences), ``unit_ids`` (one unit per passage
    sentence, in reading order; -1 outside the passage), ``group`` (the asked author), ``answer`` and
    ``sentence_ids``; plus ``hop_units`` (the units of hop 1 and hop 2) and ``attribute`` (the
    relation asked about). With ``options.answer_cue`` (the default) the answer opens with the row's
    cue ("The author of <book> was born in", protected) and the target continues it (" Lisbon" +
    EOS); without it the target is the bare entity, as in TOFU-QA. ``part``: ``"train"`` or
    ``"eval"`` (disjoint authors); ``n`` rows (default: one per author of the part)."""
    options = options or MultihopOptions()
    rows = multihop_rows(n, part=part, seed=seed, options=options)
    cols: dict[str, list] = {
        k: []
        for k in (
            "context_ids",
            "target_ids",
            "protect_mask",
            "fact_mask",
            "unit_ids",
            "group",
            "answer",
            "hop_units",
            "attribute",
        )
    }
    for row in rows:
        passage = row.passage
        ids, offsets, at = encode_passage_question(tokenizer, passage, row.question)
        spans = [(at + s, at + e) for s, e in row.sentence_spans()]
        in_passage = overlap_mask(offsets, [(at, at + len(passage))])
        # the cue opens the answer (the assistant's turn, or after "Answer:"): protected, in no unit
        cue_text = row.cue if tokenizer.chat_template else " " + row.cue
        cue = encode_text(tokenizer, cue_text) if options.answer_cue else []
        pad = [0] * len(cue)
        cols["context_ids"].append(list(ids) + cue)
        cols["protect_mask"].append((~in_passage).astype(np.int8).tolist() + [1] * len(cue))
        cols["fact_mask"].append(overlap_mask(offsets, [spans[h] for h in row.hops]).astype(np.int8).tolist() + pad)
        cols["unit_ids"].append(_span_units(offsets, spans).tolist() + [-1] * len(cue))
        answer = row.answer if tokenizer.chat_template and not cue else " " + row.answer
        cols["target_ids"].append(with_special_tokens(tokenizer, encode_text(tokenizer, answer), bos=False))
        cols["group"].append(row.group)
        cols["answer"].append(row.answer)
        cols["hop_units"].append(list(row.hops))
        cols["attribute"].append(row.attribute)
    return add_sentence_ids(Dataset.from_dict(cols), tokenizer)


def _span_units(offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """Index of the span each token overlaps (the first, for a token across two), -1 for none."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if len(off) == 0 or len(sp) == 0:
        return np.full(len(off), -1, dtype=np.int64)
    hit = (off[:, None, 0] < sp[None, :, 1]) & (sp[None, :, 0] < off[:, None, 1])
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def encode_passage_question(tokenizer, passage: str, question: str) -> tuple[list[int], list, int]:
    """Token ids of the prompt (chat template when there is one), their character offsets, and where
    the passage starts in the prompt text."""
    if tokenizer.chat_template:
        user = f"{passage}\n\nQuestion: {question}"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        enc = encode_text(tokenizer, text, offsets=True)
        return enc["input_ids"], enc["offset_mapping"], text.index(user)
    text = f"{passage}\nQuestion: {question}\nAnswer:"
    enc = encode_text(tokenizer, text, offsets=True)
    bos = bos_ids(tokenizer)
    return bos + enc["input_ids"], [(0, 0)] * len(bos) + list(enc["offset_mapping"]), 0


def load_forget_examples(
    source: str | Path | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    context_length: int = 256,
    target_length: int = 32,
    stride: int | None = None,
    max_examples: int | None = None,
    embedded_examples: int = 1000,
    seed: int = 0,
    config_name: str | None = None,
    split: str = "train",
    tofu_qa: str | None = None,
    unread_length: int = 0,
) -> Dataset:
    """Input-forgetting examples from any source.

    * ``None``/``"embedded"``: biography QA examples from the generator (seeded);
    * ``tofu_qa="train"`` or ``"eval"`` with a TOFU source (a folder of ``<split>.json``, the Hub
      name, or ``None`` for the embedded TOFU data): :func:`tofu_qa_examples`;
    * JSON rows with ``context`` and ``target`` fields: question-answer examples;
    * text (files, folders, Hub datasets): windows of ``context_length`` + ``target_length`` (and
      ``unread_length`` tokens after the target, ``unread_ids``, scored but never trained on).
    """
    if tofu_qa is not None:
        ds = tofu_qa_examples(tokenizer, source, part=tofu_qa, seed=seed)
    elif source is None or str(source) == EMBEDDED:
        ds = qa_examples(embedded_qa_rows(embedded_examples, seed), tokenizer)
    else:
        rows = load_rows(source, config_name=config_name, split=split)
        if {"context", "target"} <= set(rows.column_names):
            ds = qa_examples(rows, tokenizer)
        else:
            corpus = load_text_corpus(source, config_name=config_name, split=split)
            ds = text_windows(
                tokenize_stream(corpus, tokenizer), context_length, target_length, stride, unread_length=unread_length
            )
    if len(ds) == 0:
        raise ForgetfulError(f"no input-forgetting examples could be made from {source}")
    if max_examples is not None:
        ds = ds.select(range(min(max_examples, len(ds))))
    if "sentence_ids" not in ds.column_names:
        ds = add_sentence_ids(ds, tokenizer)
    return ds


@dataclass
class ForgetBatch:
    """Right-padded contexts and targets. Masks are 1 on real tokens. ``context_length`` and
    ``target_length`` are set (host integers) when every row has that many: then exact budgets
    compress the batch without reading sizes back from the device."""

    context_ids: torch.Tensor  # [B, n] long
    context_mask: torch.Tensor  # [B, n] bool
    target_ids: torch.Tensor  # [B, m] long
    target_mask: torch.Tensor  # [B, m] bool
    fact_mask: torch.Tensor | None = None  # [B, n] bool
    protect_mask: torch.Tensor | None = None  # [B, n] bool: always kept, outside the budget (a question)
    sentence_ids: torch.Tensor | None = None  # [B, n] long: sentence of each context token (-1: padding)
    unit_ids: torch.Tensor | None = None  # [B, n] long: the task's unit of each context token (-1: none)
    group: torch.Tensor | None = None  # [B] long: what the row belongs to (its author), for the bootstrap
    unread_ids: torch.Tensor | None = None  # [B, u] long: the tokens after the target (text windows)
    context_length: int | None = None
    target_length: int | None = None
    answers: tuple[str, ...] | None = None  # reference answers, for ROUGE of generated ones

    _TENSORS = (
        "context_ids",
        "context_mask",
        "target_ids",
        "target_mask",
        "fact_mask",
        "protect_mask",
        "sentence_ids",
        "unit_ids",
        "group",
        "unread_ids",
    )

    def _map(self, fn) -> ForgetBatch:
        return replace(self, **{k: fn(getattr(self, k)) for k in self._TENSORS if getattr(self, k) is not None})

    def units(self, spec: str) -> torch.Tensor | None:
        """``[B, n]`` unit ids of the context for a unit kind (``token``: None)."""
        return unit_ids(spec, self.context_mask, sentence_ids=self.sentence_ids, task_units=self.unit_ids)

    def to(self, device) -> ForgetBatch:
        return self._map(lambda t: t.to(device))

    def __len__(self) -> int:
        return self.context_ids.shape[0]

    def select(self, rows: slice) -> ForgetBatch:
        picked = self._map(lambda t: t[rows])
        return replace(picked, answers=self.answers[rows]) if self.answers is not None else picked


def _uniform(seqs: Sequence[Sequence]) -> int | None:
    lengths = {len(s) for s in seqs}
    return lengths.pop() if len(lengths) == 1 else None


class ForgetCollator:
    """Collates input-forgetting examples into a :class:`ForgetBatch` (right padding)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict]) -> ForgetBatch:
        contexts, targets = [r["context_ids"] for r in rows], [r["target_ids"] for r in rows]
        ctx, ctx_mask = pad_sequences(contexts, self.pad_token_id)
        tgt, tgt_mask = pad_sequences(targets, self.pad_token_id)
        flags = {}
        for column in ("fact_mask", "protect_mask"):
            if column in rows[0]:
                flags[column] = pad_sequences([r[column] for r in rows], 0)[0].bool()
        for column in ("sentence_ids", "unit_ids"):
            if column in rows[0]:
                flags[column] = pad_sequences([r[column] for r in rows], -1)[0]
        if "group" in rows[0]:
            flags["group"] = torch.tensor([int(r["group"]) for r in rows])
        if "unread_ids" in rows[0]:
            unread = [r["unread_ids"] for r in rows]
            if _uniform(unread) is None:
                raise ForgetfulError("unread_ids must have one length in every row (the tokens after each window)")
            flags["unread_ids"] = torch.tensor(unread, dtype=torch.long)
        answers = tuple(r["answer"] for r in rows) if "answer" in rows[0] else None
        return ForgetBatch(
            ctx,
            ctx_mask,
            tgt,
            tgt_mask,
            **flags,
            context_length=_uniform(contexts),
            target_length=_uniform(targets),
            answers=answers,
        )
