"""Data loading and the input-forgetting examples.

Sources, all through ``datasets``: local text files (one row per non-empty line), local JSON /
JSON-lines files, folders of those, the embedded generator (``None`` or ``"embedded"``), and Hub
names (``wikitext`` with ``wikitext-103-raw-v1``, ...) through the real Hub code path, which fails
offline with one line saying how to point at a local copy.

Input-forgetting examples are (context, target) token lists: fixed windows cut from a token stream
(context ``n`` tokens, target the next ``m``), or question-answer examples whose context is a
passage plus a question and whose target is the answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import ForgetfulError, require_file
from .hub import cache_only_when_offline, hub_error

EMBEDDED = "embedded"
TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens")
JSON_SUFFIXES = (".json", ".jsonl")


def _is_local(source: str) -> bool:
    p = Path(source)
    return p.exists() or p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES or source.startswith((".", "/", "~"))


def _load_local(path: Path) -> Dataset:
    """A Dataset from a local text or JSON file, or a folder of them."""
    from datasets import load_dataset

    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in TEXT_SUFFIXES + JSON_SUFFIXES)
        if not files:
            raise ForgetfulError(f"folder {path} holds no .txt/.json/.jsonl files")
        kinds = {f.suffix in JSON_SUFFIXES for f in files}
        if len(kinds) > 1:
            raise ForgetfulError(f"folder {path} mixes text and JSON files; point at one file instead")
    else:
        files = [require_file(path, "data file")]
    builder = "json" if files[0].suffix in JSON_SUFFIXES else "text"
    try:
        return load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # datasets wraps parser errors in several exception types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ForgetfulError(f"cannot read {builder} data from {path}: {reason}") from None


def load_hub_dataset(name: str, config_name: str | None = None, split: str = "train") -> Dataset:
    """A dataset from the Hub through ``datasets.load_dataset`` (offline: the local cache only)."""
    from datasets import load_dataset

    try:
        with cache_only_when_offline():
            return load_dataset(name, config_name, split=split)
    except (ConnectionError, OSError, ValueError) as exc:
        raise hub_error(
            "dataset", name + (f" (config {config_name})" if config_name else ""), exc,
            "to work offline, download it elsewhere and pass a local copy (a .txt, .json/.jsonl file or a folder)",
        ) from None


def load_rows(source: str | Path, *, config_name: str | None = None, split: str = "train") -> Dataset:
    """Rows from a local file/folder or a Hub dataset name."""
    source = str(source)
    if _is_local(source):
        return _load_local(Path(source).expanduser())
    return load_hub_dataset(source, config_name, split)


def load_text_corpus(
    source: str | Path | None,
    *,
    config_name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    embedded_docs: int = 2000,
    seed: int = 0,
) -> Dataset:
    """A Dataset with one ``text`` column of non-empty documents/lines.

    ``source`` is a local file or folder, a Hub name, or ``None``/``"embedded"`` for the
    embedded biography corpus (``embedded_docs`` documents, a pure function of ``seed``).
    """
    if source is None or str(source) == EMBEDDED:
        from .synthetic import pretraining_documents

        return Dataset.from_dict({"text": pretraining_documents(embedded_docs, seed=seed)})
    ds = load_rows(source, config_name=config_name, split=split)
    if text_column not in ds.column_names:
        raise ForgetfulError(
            f"{source} has no '{text_column}' column (columns: {', '.join(ds.column_names)}); "
            "name the column that holds the text with --text-column"
        )
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    ds = ds.filter(lambda b: [isinstance(t, str) and bool(t.strip()) for t in b["text"]], batched=True)
    if len(ds) == 0:
        raise ForgetfulError(f"corpus {source} is empty: it has no non-blank text")
    return ds


def encode(tokenizer: PreTrainedTokenizerBase, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of ``text`` without the tokenizer's own special tokens; optionally BOS first."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def tokenize_stream(corpus: Dataset, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """All documents of ``corpus`` tokenized and concatenated, each followed by EOS."""
    eos = tokenizer.eos_token_id

    def tok(batch):
        out = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [ids + ([eos] if eos is not None else []) for ids in out]}

    ids = corpus.map(tok, batched=True, remove_columns=corpus.column_names, desc="Tokenizing")["ids"]
    return np.fromiter((t for doc in ids for t in doc), dtype=np.int64)


def text_windows(
    stream: np.ndarray, context_length: int, target_length: int, stride: int | None = None,
    max_windows: int | None = None,
) -> Dataset:
    """Cut a token stream into windows: context = ``n`` tokens, target = the next ``m``.
    Windows do not overlap unless ``stride`` < n + m."""
    n, m = int(context_length), int(target_length)
    if n < 1 or m < 1:
        raise ForgetfulError(f"context and target lengths must be positive, got n={n}, m={m}")
    window = n + m
    stride = stride or window
    if len(stream) < window:
        raise ForgetfulError(
            f"the corpus has {len(stream)} tokens, fewer than one window of context {n} + target {m} = {window}; "
            "use more text or smaller --context-length/--target-length"
        )
    starts = np.arange(0, len(stream) - window + 1, stride)
    if max_windows is not None:
        starts = starts[:max_windows]
    idx = starts[:, None] + np.arange(window)[None, :]
    w = stream[idx]
    return Dataset.from_dict({"context_ids": w[:, :n].tolist(), "target_ids": w[:, n:].tolist()})


def qa_examples(rows: Sequence[dict] | Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Question-answer examples: ``context`` (passage + question) and ``target`` (the answer,
    followed by EOS). Contexts start with BOS, the attention sink that policies always keep.
    Rows with ``fact_spans`` (character spans in the context) also get a token ``fact_mask``."""
    ctx_ids, tgt_ids, fact_masks = [], [], []
    has_spans = len(rows) > 0 and "fact_spans" in rows[0]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        if not isinstance(row.get("context"), str) or not isinstance(row.get("target"), str):
            raise ForgetfulError("question-answer rows need string fields 'context' and 'target'")
        if not row["target"].strip() or not row["context"].strip():
            raise ForgetfulError(f"empty context or target in row with context {row['context'][:40]!r}: "
                                 "every example needs both (zero-length sequences cannot be scored)")
        enc = tokenizer(row["context"], add_special_tokens=False, return_offsets_mapping=has_spans)
        ctx_ids.append(bos + enc["input_ids"])
        target = tokenizer(row["target"], add_special_tokens=False)["input_ids"] + eos
        if not target:
            raise ForgetfulError(f"empty target in row with context {row['context'][:40]!r}")
        tgt_ids.append(target)
        if has_spans:
            spans = row["fact_spans"]
            mask = [int(any(s < e_tok and s_tok < e for s, e in spans)) for s_tok, e_tok in enc["offset_mapping"]]
            fact_masks.append([0] * len(bos) + mask)
    cols = {"context_ids": ctx_ids, "target_ids": tgt_ids}
    if has_spans:
        cols["fact_mask"] = fact_masks
    return Dataset.from_dict(cols)


def embedded_qa_rows(n: int, seed: int, n_facts: int = 3, n_filler: int = 6) -> list[dict]:
    from .synthetic import biography_examples

    return [ex.as_dict() for ex in biography_examples(n, seed=seed, n_facts=n_facts, n_filler=n_filler)]


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
) -> Dataset:
    """Input-forgetting examples from any source.

    * ``None``/``"embedded"``: biography QA examples from the generator (seeded);
    * JSON rows with ``context`` and ``target`` fields: question-answer examples;
    * text (files, folders, Hub datasets): windows of ``context_length`` + ``target_length``.
    """
    if source is None or str(source) == EMBEDDED:
        ds = qa_examples(embedded_qa_rows(embedded_examples, seed), tokenizer)
    else:
        rows = load_rows(source, config_name=config_name, split=split)
        if {"context", "target"} <= set(rows.column_names):
            ds = qa_examples(rows, tokenizer)
        else:
            corpus = load_text_corpus(source, config_name=config_name, split=split)
            ds = text_windows(tokenize_stream(corpus, tokenizer), context_length, target_length, stride)
    if len(ds) == 0:
        raise ForgetfulError(f"no input-forgetting examples could be made from {source}")
    if max_examples is not None:
        ds = ds.select(range(min(max_examples, len(ds))))
    return ds


@dataclass
class ForgetBatch:
    """Right-padded contexts and targets. Masks are 1 on real tokens."""

    context_ids: torch.Tensor  # [B, n] long
    context_mask: torch.Tensor  # [B, n] bool
    target_ids: torch.Tensor  # [B, m] long
    target_mask: torch.Tensor  # [B, m] bool
    fact_mask: torch.Tensor | None = None  # [B, n] bool

    def to(self, device) -> ForgetBatch:
        return ForgetBatch(*(t.to(device) if t is not None else None for t in (
            self.context_ids, self.context_mask, self.target_ids, self.target_mask, self.fact_mask)))

    def __len__(self) -> int:
        return self.context_ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> ForgetBatch:
        return ForgetBatch(*(t[rows] if t is not None else None for t in (
            self.context_ids, self.context_mask, self.target_ids, self.target_mask, self.fact_mask)))


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad integer sequences to one width; returns (padded [B, W], mask of real tokens)."""
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max()) if width is None else width
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    mask = torch.arange(out.shape[1])[None, :] < lengths[:, None]
    out[mask] = flat
    return out, mask


class ForgetCollator:
    """Collates input-forgetting examples into a :class:`ForgetBatch` (right padding)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict]) -> ForgetBatch:
        ctx, ctx_mask = pad_sequences([r["context_ids"] for r in rows], self.pad_token_id)
        tgt, tgt_mask = pad_sequences([r["target_ids"] for r in rows], self.pad_token_id)
        fact = None
        if "fact_mask" in rows[0]:
            fact, _ = pad_sequences([r["fact_mask"] for r in rows], 0)
            fact = fact.bool()
        return ForgetBatch(ctx, ctx_mask, tgt, tgt_mask, fact)


def write_jsonl(rows: Sequence[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
