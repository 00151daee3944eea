"""TOFU data: every split, from the Hub (``locuslab/TOFU``), a local folder of ``<split>.json``
files (JSON lines, e.g. ../shared/data/tofu), or the embedded generator.

The finetuning format is Phi style, ``"Question: {q}\\nAnswer: {a}"``, with the loss on the
answer and EOS; :func:`encode_qa` is the one encoder that training and evaluation share.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..errors import ForgetfulError
from ..tokens import PromptAnswer, encode_prompt, encode_prompt_answer
from .embedded import tofu_splits
from .sources import load_hub_dataset, load_rows, write_jsonl

TOFU_HUB_NAME = "locuslab/TOFU"
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
FORGET_SPLITS = ("forget01", "forget05", "forget10")
RETAIN_FOR_FORGET = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
TRAIN_SPLITS = ("full", "retain99", "retain95", "retain90")

_REQUIRED = {
    "perturbed": ("question", "answer", "paraphrased_answer", "perturbed_answer"),
    "options": ("question", "answer", "perturbed_answer"),
    "plain": ("question", "answer"),
}


def split_kind(split: str) -> str:
    if split in ("real_authors_perturbed", "world_facts_perturbed"):
        return "options"
    return "perturbed" if split.endswith("_perturbed") else "plain"


def prompt_for(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def encode_qa(tokenizer, question: str, answer: str, max_length: int | None = None) -> PromptAnswer:
    """A TOFU question and answer as the model is trained and scored on them."""
    return encode_prompt_answer(tokenizer, prompt_for(question), answer, max_length)


def encode_question(tokenizer, question: str) -> list[int]:
    """The prompt a model answers a TOFU question from (the prompt part of :func:`encode_qa`)."""
    return encode_prompt(tokenizer, prompt_for(question))


@functools.cache
def _embedded(num_authors: int, seed: int) -> dict[str, list[dict]]:
    return tofu_splits(num_authors, seed)


def is_embedded(source: str | Path | None) -> bool:
    return source is None or str(source) == "embedded"


def load_tofu_split(source: str | Path | None, split: str, *, num_authors: int = 200, seed: int = 0) -> list[dict]:
    """Rows of one TOFU split, checked for the fields the split must have.

    ``source``: ``None``/``"embedded"`` (generator with ``num_authors``), a local folder of
    ``<split>.json`` files, or a Hub dataset name such as ``locuslab/TOFU``.
    """
    if is_embedded(source):
        splits = _embedded(num_authors, seed)
        if split not in splits:
            raise ForgetfulError(f"unknown TOFU split '{split}'; the splits are {', '.join(sorted(splits))}")
        rows = [dict(r) for r in splits[split]]  # copies: the cached splits stay untouched
    elif Path(str(source)).expanduser().exists() or str(source).startswith((".", "/", "~")):
        folder = Path(str(source)).expanduser()
        if not folder.exists():
            raise ForgetfulError(f"TOFU data folder not found: {folder} does not exist")
        if not folder.is_dir():
            raise ForgetfulError(f"TOFU data must be a folder of <split>.json files, got the file {folder}")
        path = folder / f"{split}.json"
        if not path.exists():
            raise ForgetfulError(f"TOFU split '{split}' is missing: {path} does not exist")
        rows = load_rows(path).to_list()
    else:
        rows = load_hub_dataset(str(source), split, split="train").to_list()
    if not rows:
        raise ForgetfulError(f"TOFU split '{split}' from {source or 'embedded'} is empty")
    required = _REQUIRED[split_kind(split)]
    missing = [f for f in required if f not in rows[0]]
    if missing:
        raise ForgetfulError(f"TOFU split '{split}' lacks the field(s) {', '.join(missing)} (has {', '.join(rows[0])})")
    return rows


def forget_keys(source, forget_split: str, **kw) -> set[tuple[str, str]]:
    """(question, answer) pairs of a forget split, to find its rows inside ``full``."""
    if forget_split not in FORGET_SPLITS:
        raise ForgetfulError(f"forget split must be one of {', '.join(FORGET_SPLITS)}, got '{forget_split}'")
    return {(r["question"], r["answer"]) for r in load_tofu_split(source, forget_split, **kw)}


def write_tofu_folder(out_dir: str | Path, num_authors: int = 200, seed: int = 0) -> Path:
    """Write every split as ``<split>.json`` (JSON lines), like ../shared/data/tofu."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tofu_splits(num_authors, seed).items():
        write_jsonl(rows, out / f"{name}.json")
    return out
