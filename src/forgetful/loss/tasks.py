"""``prepare_dataset_for_training``: a registry of tasks that turn a data source into rows of
``input_ids``, ``attention_mask`` and ``loss_mask`` for :class:`SelectiveLossTrainer`.

Built in:

* ``embedded`` - the embedded reading-comprehension corpus, in curriculum order: copy documents
  first, then biography passages whose questions and answers are trained (passages are context);
* ``text`` - plain language modelling over files, the Hub or the embedded corpus; packed blocks
  or one document per row; loss on all tokens, or a ``random``/``goldfish`` mask;
* ``completion`` - prompt/completion JSON lines; loss on the completion and EOS, minus optional
  ``forget_spans`` (character spans inside the completion);
* ``tofu`` - TOFU finetuning on ``full`` or ``retainYY`` with a forgetting strategy for the rows of
  the forget split: ``answer_only`` (standard finetuning), ``forget_answers`` (their answers
  masked whole), ``forget_facts`` (only the fact tokens of their answers masked), ``goldfish``,
  ``random``, ``surprise`` (the tokens the model before finetuning finds least predictable); with
  ``share``, the last four mask that share of the forget answers' tokens (:mod:`.share_masks`).
  Rows are encoded by :func:`~forgetful.data.tofu.encode_qa`, as the TOFU evaluation
  reads them (open-unlearning's format: chat template or plain text, attention mask
  ``token != pad``).

Register your own with ``@register_task("name")``; the function takes the tokenizer and keyword
options and returns a ``datasets.Dataset``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..data.embedded import pretraining_segments
from ..data.sources import load_rows, load_text_corpus, tokenize_stream
from ..data.tofu import (
    DEFAULT_DATE_STRING,
    DEFAULT_MAX_LENGTH,
    DEFAULT_SYSTEM_PROMPT,
    FORGET_SPLITS,
    TRAIN_SPLITS,
    TofuTemplate,
    encode_qa,
    forget_keys,
    load_tofu_split,
)
from ..errors import ForgetfulError, check_probability
from ..tokens import bos_ids, encode_prompt_answer, encode_text, eos_ids, with_special_tokens
from .masks import completion_only, fact_spans, goldfish_mask, random_mask, span_mask
from .share_masks import ForgetAnswer, fact_subset_masks, goldfish_k, random_share_masks, surprise_masks

TaskFn = Callable[..., Dataset]
TASKS: dict[str, TaskFn] = {}
TOFU_STRATEGIES = ("answer_only", "forget_answers", "forget_facts", "goldfish", "random", "surprise")
#: the strategies that take a share of the forget answers' tokens (``surprise`` only with one)
SHARE_STRATEGIES = ("forget_facts", "goldfish", "random", "surprise")
TEXT_MASKS = ("all", "random", "goldfish")


def register_task(name: str) -> Callable[[TaskFn], TaskFn]:
    """Decorator: make ``fn(tokenizer, **options) -> Dataset`` available by ``name``."""

    def deco(fn: TaskFn) -> TaskFn:
        TASKS[name] = fn
        return fn

    return deco


def prepare_dataset_for_training(task: str, tokenizer: PreTrainedTokenizerBase, **options) -> Dataset:
    """Rows with ``input_ids``, ``attention_mask`` and ``loss_mask`` for the registered ``task``.

    >>> ds = prepare_dataset_for_training("tofu", tokenizer, split="full", strategy="forget_facts")
    """
    if task not in TASKS:
        raise ForgetfulError(f"unknown task '{task}'; registered tasks: {', '.join(sorted(TASKS))}")
    fn = TASKS[task]
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            allowed = [p for p in params if p != "tokenizer"]
            raise ForgetfulError(
                f"task '{task}' has no option(s) {', '.join(unknown)}; its options: {', '.join(allowed)}"
            )
    ds = fn(tokenizer, **options)
    if len(ds) == 0:
        raise ForgetfulError(f"task '{task}' produced no training rows")
    return ds


def _rows(
    input_ids: list[list[int]], loss_masks: list[np.ndarray], attention_masks: list[list[int]] | None = None
) -> Dataset:
    return Dataset.from_dict(
        {
            "input_ids": input_ids,
            "attention_mask": attention_masks or [[1] * len(x) for x in input_ids],
            "loss_mask": [m.astype(np.int8).tolist() for m in loss_masks],
        }
    )


def _text_mask(ids: list[int], mask: str, p: float, k: int, h: int, seed: int) -> np.ndarray:
    if mask == "all":
        return np.ones(len(ids), dtype=np.int8)
    if mask == "random":
        return random_mask(len(ids), p, seed)
    if mask == "goldfish":
        return goldfish_mask(ids, k, h)
    raise ForgetfulError(f"unknown text mask '{mask}'; choose from {', '.join(TEXT_MASKS)}")


@register_task("embedded")
def embedded_task(
    tokenizer: PreTrainedTokenizerBase,
    *,
    docs: int = 8000,
    copy_docs: int | None = None,
    max_facts: int = 4,
    max_filler: int = 4,
    block_size: int = 256,
    seed: int = 0,
) -> Dataset:
    """The embedded pretraining corpus (:func:`forgetful.data.embedded.pretraining_segments`), rows in
    curriculum order (train it with ``train_sampling_strategy="sequential"``): BOS, then each
    segment, with the loss on the trained segments and EOS."""
    if docs < 1:
        raise ForgetfulError(f"docs must be at least 1, got {docs}")
    segments = pretraining_segments(docs, seed, max_facts=max_facts, max_filler=max_filler, copy_docs=copy_docs)
    flat = [text for doc in segments for text, _ in doc]
    encoded = iter(encode_text(tokenizer, flat))
    ids_out, masks = [], []
    for doc in segments:
        ids, mask = [], []
        for _, trained in doc:
            seg = next(encoded)
            ids += seg
            mask += [int(trained)] * len(seg)
        # BOS is context (never trained), EOS is trained
        mask = [0] * len(bos_ids(tokenizer)) + mask + [1] * len(eos_ids(tokenizer))
        ids, mask = with_special_tokens(tokenizer, ids)[:block_size], mask[:block_size]
        ids_out.append(ids)
        masks.append(np.asarray(mask, dtype=np.int8))
    return _rows(ids_out, masks)


@register_task("text")
def text_task(
    tokenizer: PreTrainedTokenizerBase,
    source: str | None = None,
    *,
    block_size: int = 128,
    packing: bool = True,
    mask: str = "all",
    p: float = 0.1,
    k: int = 4,
    h: int = 13,
    seed: int = 0,
    config_name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    embedded_docs: int = 2000,
    max_rows: int | None = None,
) -> Dataset:
    """Language modelling. ``packing``: concatenate documents (EOS between) and cut blocks of
    ``block_size``; else one document per row (BOS + text + EOS, truncated)."""
    if block_size < 2:
        raise ForgetfulError(f"block_size must be at least 2, got {block_size}")
    if mask not in TEXT_MASKS:
        raise ForgetfulError(f"unknown text mask '{mask}'; choose from {', '.join(TEXT_MASKS)}")
    corpus = load_text_corpus(
        source, config_name=config_name, split=split, text_column=text_column, embedded_docs=embedded_docs, seed=seed
    )
    if packing:
        stream = tokenize_stream(corpus, tokenizer)
        n_blocks = len(stream) // block_size
        if n_blocks == 0:
            raise ForgetfulError(
                f"corpus {source or 'embedded'} has {len(stream)} tokens, fewer than one block of {block_size}; "
                "use more text or a smaller --block-size"
            )
        blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size).tolist()
    else:
        enc = encode_text(tokenizer, list(corpus["text"]))
        blocks = [with_special_tokens(tokenizer, ids)[:block_size] for ids in enc]
    if max_rows is not None:
        blocks = blocks[:max_rows]
    masks = [_text_mask(b, mask, p, k, h, seed * 1_000_003 + i) for i, b in enumerate(blocks)]
    return _rows(blocks, masks)


@register_task("completion")
def completion_task(
    tokenizer: PreTrainedTokenizerBase,
    source: str | None = None,
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    spans_field: str = "forget_spans",
    max_length: int = 512,
    mask: str = "all",
    p: float = 0.1,
    k: int = 4,
    h: int = 13,
    seed: int = 0,
) -> Dataset:
    """Prompt/completion rows (JSON lines). Loss on the completion and EOS; character spans in
    ``forget_spans`` (relative to the completion) are forgotten; ``mask`` adds random/goldfish."""
    if source is None:
        raise ForgetfulError("the completion task needs a source: a JSON-lines file with prompt and completion fields")
    rows = load_rows(source)
    for f in (prompt_field, completion_field):
        if f not in rows.column_names:
            raise ForgetfulError(f"{source} has no '{f}' field (fields: {', '.join(rows.column_names)})")
    ids_out, masks = [], []
    has_spans = spans_field in rows.column_names
    for i, row in enumerate(rows):
        enc = encode_prompt_answer(tokenizer, row[prompt_field], row[completion_field], max_length)
        ids, prompt_len, offsets = enc.ids, enc.prompt_length, enc.offsets
        m = completion_only(prompt_len, len(ids))
        if has_spans and row[spans_field]:
            # spans are relative to the completion; the answer text has one leading space
            spans = [(s + 1, e + 1) for s, e in row[spans_field]]
            m[prompt_len:] &= span_mask(offsets, spans)[: len(ids) - prompt_len]
        if mask != "all":
            m[prompt_len:] &= _text_mask(ids, mask, p, k, h, seed * 1_000_003 + i)[prompt_len:]
        ids_out.append(ids)
        masks.append(m)
    return _rows(ids_out, masks)


@register_task("tofu")
def tofu_task(
    tokenizer: PreTrainedTokenizerBase,
    source: str | None = None,
    *,
    split: str = "full",
    forget_split: str = "forget10",
    strategy: str = "answer_only",
    max_length: int = DEFAULT_MAX_LENGTH,
    p: float = 0.5,
    k: int = 4,
    h: int = 13,
    share: float | None = None,
    surprise_scores: str | None = None,
    spacy_model=None,
    seed: int = 0,
    num_authors: int = 200,
    template: str = "auto",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    date_string: str | None = DEFAULT_DATE_STRING,
) -> Dataset:
    """TOFU finetuning rows of ``split`` (``full``, ``retainYY``, or a forget split, the rows that
    unlearning trains on). The strategy applies to the rows of ``forget_split`` inside ``split``;
    all other rows train on every scored token (the answer and what follows it).
    ``share``: mask that share of the forget answers' tokens (``forget_facts``: a random subset of the
    fact spans; ``goldfish``: k = round(1 / share); ``random``: exactly that many; ``surprise``: the
    highest-NLL ones, read from ``surprise_scores``, a JSON file of :func:`surprise_score_rows`).
    ``template``/``system_prompt``/``date_string``: the prompt format (:class:`TofuTemplate`)."""
    if strategy not in TOFU_STRATEGIES:
        raise ForgetfulError(f"unknown TOFU strategy '{strategy}'; choose from {', '.join(TOFU_STRATEGIES)}")
    if split not in TRAIN_SPLITS + FORGET_SPLITS:
        raise ForgetfulError(
            f"TOFU training split must be one of {', '.join(TRAIN_SPLITS + FORGET_SPLITS)}, got '{split}'"
        )
    if strategy == "random":
        check_probability("random mask p", p, allow_one=True)
    if share is not None and strategy not in SHARE_STRATEGIES:
        raise ForgetfulError(
            f"strategy '{strategy}' takes no share; strategies with one: {', '.join(SHARE_STRATEGIES)}"
        )
    if strategy == "surprise" and (share is None or surprise_scores is None):
        raise ForgetfulError(
            "the surprise strategy needs a share and surprise_scores (the forget answers' token NLL under the model "
            "before finetuning: forgetful.tofu.surprise.write_surprise_scores)"
        )
    if strategy == "goldfish" and share is not None:
        k = goldfish_k(share)
    fmt = TofuTemplate(kind=template, system_prompt=system_prompt, date_string=date_string)
    kw = {"num_authors": num_authors, "seed": seed}
    rows = load_tofu_split(source, split, **kw)
    forget = forget_keys(source, forget_split, **kw) if strategy != "answer_only" else set()
    encoded = [encode_qa(tokenizer, row["question"], row["answer"], max_length, fmt) for row in rows]
    forget_rows = [i for i, row in enumerate(rows) if (row["question"], row["answer"]) in forget]
    shared = {}
    if share is not None and strategy != "goldfish":
        nll = _surprise_nll(surprise_scores, [rows[i] for i in forget_rows]) if strategy == "surprise" else None
        answers = [
            ForgetAnswer(encoded[i].answer_text, encoded[i].offsets, None if nll is None else nll[j])
            for j, i in enumerate(forget_rows)
        ]
        if strategy == "surprise":
            built = surprise_masks(answers, share)
        elif strategy == "forget_facts":
            built = fact_subset_masks(answers, share, seed, spacy_model)
        else:
            built = random_share_masks(answers, share, seed)
        shared = dict(zip(forget_rows, built))
    ids_out, masks, attention = [], [], []
    forget_set = set(forget_rows)
    for i, enc in enumerate(encoded):
        ids, prompt_len, offsets, answer_text = enc.ids, enc.prompt_length, enc.offsets, enc.answer_text
        m = completion_only(prompt_len, len(ids))
        if i in forget_set:
            answer_mask = m[prompt_len:]  # a view: edits land in m
            n_ans = len(answer_mask)
            if i in shared:
                answer_mask &= shared[i]
            elif strategy == "forget_answers":
                answer_mask[:] = 0
            elif strategy == "forget_facts":
                answer_mask &= span_mask(offsets, fact_spans(answer_text, spacy_model))[:n_ans]
            elif strategy == "goldfish":
                answer_mask &= goldfish_mask(ids, k, h)[prompt_len:]
            elif strategy == "random":
                answer_mask &= random_mask(n_ans, p, seed * 1_000_003 + i)
        ids_out.append(ids)
        masks.append(m)
        attention.append(enc.attention_mask)
    return _rows(ids_out, masks, attention)


def surprise_score_rows(rows: list[dict], nll: list) -> list[dict]:
    """The content of a ``surprise_scores`` file: per forget row its question, answer and the NLL of
    each scored token (``nll[i]``, as :func:`~.share_masks.answer_token_nll` gives it)."""
    return [{"question": r["question"], "answer": r["answer"], "nll": [float(x) for x in v]} for r, v in zip(rows, nll)]


def _surprise_nll(path: str, rows: list[dict]) -> list[list[float]]:
    import json
    from pathlib import Path

    try:
        scored = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError) as exc:
        raise ForgetfulError(f"cannot read the surprise scores {path} ({exc}); write them again") from None
    by_key = {(r["question"], r["answer"]): r["nll"] for r in scored}
    missing = [r["question"] for r in rows if (r["question"], r["answer"]) not in by_key]
    if missing:
        raise ForgetfulError(
            f"the surprise scores {path} have no NLL for {len(missing)} forget rows (e.g. '{missing[0]}'): they were "
            "written for other data; delete the file to score this data"
        )
    return [by_key[(r["question"], r["answer"])] for r in rows]
