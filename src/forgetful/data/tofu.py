"""TOFU data: every split, from the Hub (``locuslab/TOFU``), a local folder of ``<split>.json``
files (JSON lines, e.g. ../shared/data/tofu), or the embedded generator; and :func:`encode_qa`,
the one encoder of a question and its answer that training and evaluation share.

The encoding is open-unlearning's (``src/data/utils.py::preprocess_chat_instance``), quirks
included, because its code defines the benchmark's numbers:

* **chat template** (instruct models, :class:`TofuTemplate` ``kind="chat"``, the default when the
  tokenizer has one): the full text is the tokenizer's chat template over ``[system, user,
  assistant]`` (system prompt ``"You are a helpful assistant."`` and the template variable
  ``date_string="10 Apr 2025"``, as open-unlearning's Llama-3.2-Instruct config gives them),
  the prompt the template over ``[system, user]`` with the generation prompt; both tokenised
  without the tokenizer's own special tokens (a BOS only if the template writes one); no truncation.
* **plain text** (``kind="plain"``): the full text is ``"Question: " + q + "\\n" + "Answer: " + a``,
  the prompt ``"Question: " + q + "\\nAnswer: "`` (with the trailing space), both tokenised *with*
  the tokenizer's own special tokens and truncated to ``max_length`` apart. The prompt's lone
  trailing space token is merged into the first answer word in the full text, so the first
  answer token falls inside the prompt's length and is not scored; generation starts after the
  lone space.
* Then EOS is appended unless the sequence already ends with it (ChatML templates end with
  ``<|im_end|>\\n``, so they get a second ``<|im_end|>``). The first ``len(prompt)`` tokens are
  unscored whatever they are (``prompt_length``); every later token is scored, EOS included.
* The attention mask is ``token != pad`` (open-unlearning's collator), so tokens equal to the pad
  id inside a sequence (EOS when the pad token is EOS: ChatML's ``<|im_end|>``) are not attended to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..errors import ForgetfulError
from ..tokens import PromptAnswer, eos_ids, pad_token_id
from .embedded_tofu import tofu_splits
from .locations import NAMED, resolve
from .sources import load_hub_dataset, load_rows, write_jsonl

TOFU_HUB_NAME = "locuslab/TOFU"
TEMPLATE_KINDS = ("auto", "chat", "plain")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_DATE_STRING = "10 Apr 2025"
DEFAULT_MAX_LENGTH = 512
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


@dataclass(frozen=True)
class TofuTemplate:
    """How a TOFU question and answer become text, as open-unlearning's model configs say
    (``template_args``): ``kind`` ``chat`` (``apply_chat_template: True``, with ``system_prompt``
    and ``date_string``; empty or ``None`` leaves them out), ``plain`` (the tags of its phi-1.5 /
    Llama-2 configs), or ``auto`` (chat when the tokenizer has a chat template)."""

    kind: str = "auto"
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    date_string: str | None = DEFAULT_DATE_STRING
    user_start_tag: str = "Question: "
    user_end_tag: str = "\n"
    asst_start_tag: str = "Answer: "

    def __post_init__(self):
        if self.kind not in TEMPLATE_KINDS:
            raise ForgetfulError(f"TOFU template must be one of {', '.join(TEMPLATE_KINDS)}, got '{self.kind}'")

    def is_chat(self, tokenizer) -> bool:
        if self.kind == "auto":
            return bool(getattr(tokenizer, "chat_template", None))
        if self.kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ForgetfulError(
                "the TOFU template is 'chat' but the tokenizer has no chat template; use --template plain"
            )
        return self.kind == "chat"

    def texts(self, tokenizer, question: str, answer: str | None) -> tuple[str, str | None, bool]:
        """(prompt text, full text or None without an answer, whether it is the chat template)."""
        if not self.is_chat(tokenizer):
            prompt = self.user_start_tag + question + self.user_end_tag + self.asst_start_tag
            return prompt, None if answer is None else prompt + answer, False
        chat = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        chat.append({"role": "user", "content": question})
        extra = {"date_string": self.date_string} if self.date_string else {}
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **extra)
        if answer is None:
            return prompt, None, True
        chat.append({"role": "assistant", "content": answer})
        full = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False, **extra)
        return prompt, full, True


@dataclass(frozen=True)
class TofuEncoding(PromptAnswer):
    """A TOFU question and answer as tokens: ``ids`` (the full sequence, EOS last),
    ``prompt_length`` (the unscored prefix: every later token is scored), ``offsets`` (the
    character span of each scored token relative to the answer's start; the merged first
    answer token of the plain template can start before it), ``answer_text`` (the answer), and
    ``attention_mask`` (``token != pad``)."""

    attention_mask: list[int]


def _tokenize(tokenizer, text: str, chat: bool, max_length: int | None, offsets: bool = False) -> dict:
    kw = {} if chat or max_length is None else {"max_length": max_length, "truncation": True}
    return tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=offsets, **kw)


def encode_qa(
    tokenizer,
    question: str,
    answer: str,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    template: TofuTemplate | None = None,
) -> TofuEncoding:
    """A TOFU question and answer as the model is trained and scored on them (see the module
    docstring for the rules)."""
    template = template or TofuTemplate()
    prompt, full, chat = template.texts(tokenizer, question, answer)
    enc = _tokenize(tokenizer, full, chat, max_length, offsets=True)
    ids = list(enc["input_ids"])
    spans = [tuple(o) for o in enc["offset_mapping"]]
    prompt_length = len(_tokenize(tokenizer, prompt, chat, max_length)["input_ids"])
    eos = eos_ids(tokenizer)
    if eos and (not ids or ids[-1] != eos[0]):
        ids += eos
        spans.append((len(full), len(full)))
    start = len(prompt) if full.startswith(prompt) else max(full.rfind(answer), 0)
    prompt_length = min(prompt_length, len(ids))
    pad = pad_token_id(tokenizer)
    return TofuEncoding(
        ids=ids,
        prompt_length=prompt_length,
        offsets=[(s - start, e - start) for s, e in spans[prompt_length:]],
        answer_text=answer,
        attention_mask=[int(t != pad) for t in ids],
    )


def encode_question(
    tokenizer, question: str, max_length: int | None = DEFAULT_MAX_LENGTH, template: TofuTemplate | None = None
) -> list[int]:
    """The prompt a model answers a TOFU question from: what :func:`encode_qa` leaves unscored
    (for the plain template it ends with the lone space token)."""
    prompt, _, chat = (template or TofuTemplate()).texts(tokenizer, question, None)
    return list(_tokenize(tokenizer, prompt, chat, max_length)["input_ids"])


@functools.cache
def _embedded(num_authors: int, seed: int) -> dict[str, list[dict]]:
    return tofu_splits(num_authors, seed)


def is_embedded(source: str | Path | None) -> bool:
    return source is None or str(source) == "embedded"


def load_tofu_split(source: str | Path | None, split: str, *, num_authors: int = 200, seed: int = 0) -> list[dict]:
    """Rows of one TOFU split, checked for the fields the split must have.

    ``source``: ``None``/``"embedded"`` (generator with ``num_authors``), ``tofu`` (the real data:
    ``$FORGETFUL_DATA/tofu``, else ``locuslab/TOFU`` from the Hub), a local folder of ``<split>.json``
    files, or a Hub dataset name.
    """
    if str(source) in NAMED and str(source) != "tofu":
        raise ForgetfulError(f"{source} is not TOFU: pass tofu, embedded, a folder of <split>.json or a Hub name")
    found = resolve(source) if source is not None else None
    if is_embedded(source):
        splits = _embedded(num_authors, seed)
        if split not in splits:
            raise ForgetfulError(f"unknown TOFU split '{split}'; the splits are {', '.join(sorted(splits))}")
        rows = [dict(r) for r in splits[split]]  # copies: the cached splits stay untouched
    elif found.on_hub:
        rows = load_hub_dataset(found.source, split, split="train", local_hint=found.offline_hint()).to_list()
    elif Path(found.source).expanduser().exists() or found.source.startswith((".", "/", "~")):
        source = found.source
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
