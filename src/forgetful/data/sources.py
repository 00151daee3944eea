"""Data sources, all through ``datasets``: local text files (one row per non-empty line), local
JSON / JSON-lines files, folders of those, the embedded generator (``None`` or ``"embedded"``),
known datasets by name (``wikitext2:test``: ``$FORGETFUL_DATA`` or the Hub, see
:mod:`.locations`), and Hub names (``wikitext`` with ``wikitext-103-raw-v1``, ...) through the real
Hub code path, which fails offline with one line saying how to point at a local copy. Plus the token stream of a corpus
and fixed windows cut from it (context ``n`` tokens, target the next ``m``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..errors import ForgetfulError, require_file
from ..hub import cache_only_when_offline, hub_error
from ..tokens import encode_text, with_special_tokens
from .locations import resolve

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


def load_hub_dataset(
    name: str, config_name: str | None = None, split: str = "train", local_hint: str | None = None
) -> Dataset:
    """A dataset from the Hub through ``datasets.load_dataset`` (offline: the local cache only)."""
    from datasets import load_dataset

    try:
        with cache_only_when_offline():
            return load_dataset(name, config_name, split=split)
    except (ConnectionError, OSError, ValueError) as exc:
        raise hub_error(
            "dataset",
            name + (f" (config {config_name})" if config_name else ""),
            exc,
            local_hint
            or "to work offline, download it elsewhere and pass a local copy (a .txt, .json/.jsonl file or a folder)",
        ) from None


def load_rows(source: str | Path, *, config_name: str | None = None, split: str = "train") -> Dataset:
    """Rows from a local file/folder, a known dataset's name (``wikitext2:test``, ...:
    :mod:`~forgetful.data.locations`) or a Hub dataset name."""
    found = resolve(source)
    if found.on_hub:
        return load_hub_dataset(found.source, found.config, found.split, found.offline_hint())
    source = found.source
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
        from .embedded import pretraining_documents

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


def tokenize_stream(corpus: Dataset, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """All documents of ``corpus`` tokenized and concatenated, each followed by EOS."""

    def tok(batch):
        return {
            "ids": [with_special_tokens(tokenizer, ids, bos=False) for ids in encode_text(tokenizer, batch["text"])]
        }

    ids = corpus.map(tok, batched=True, remove_columns=corpus.column_names, desc="Tokenizing")["ids"]
    return np.fromiter((t for doc in ids for t in doc), dtype=np.int64)


def text_windows(
    stream: np.ndarray,
    context_length: int,
    target_length: int,
    stride: int | None = None,
    max_windows: int | None = None,
    unread_length: int = 0,
) -> Dataset:
    """Cut a token stream into windows: context = ``n`` tokens, target = the next ``m`` (and, with
    ``unread_length`` u > 0, ``unread_ids`` = the ``u`` tokens after the target, which nothing
    trains on: what a keep set chosen for the target does for text it never saw). Windows do not
    overlap unless ``stride`` < n + m + u."""
    n, m, u = int(context_length), int(target_length), int(unread_length)
    if n < 1 or m < 1 or u < 0:
        raise ForgetfulError(f"context and target lengths must be positive, got n={n}, m={m} (unread {u})")
    window = n + m + u
    stride = stride or window
    if len(stream) < window:
        raise ForgetfulError(
            f"the corpus has {len(stream)} tokens, fewer than one window of context {n} + target {m}"
            f"{f' + unread {u}' if u else ''} = {window}; use more text or smaller --context-length/--target-length"
        )
    starts = np.arange(0, len(stream) - window + 1, stride)
    if max_windows is not None:
        starts = starts[:max_windows]
    idx = starts[:, None] + np.arange(window)[None, :]
    w = stream[idx]
    columns = {"context_ids": w[:, :n].tolist(), "target_ids": w[:, n : n + m].tolist()}
    if u:
        columns["unread_ids"] = w[:, n + m :].tolist()
    return Dataset.from_dict(columns)


def write_jsonl(rows: Sequence[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
