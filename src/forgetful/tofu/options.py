"""Option groups that several TOFU commands share, each declared once: which data and prompt format
(:class:`TofuDataOptions`) and how a run is evaluated (:class:`TofuEvalOptions`). The commands'
configs (``eval-tofu``, ``unlearn``, ``tofu-experiment``) inherit them, so a flag means the same
everywhere and has one default and one help text."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..data.tofu import (
    DEFAULT_DATE_STRING,
    DEFAULT_MAX_LENGTH,
    DEFAULT_SYSTEM_PROMPT,
    FORGET_SPLITS,
    TEMPLATE_KINDS,
    TofuTemplate,
)
from ..errors import ForgetfulError


@dataclass(kw_only=True)
class TofuSplitOptions:
    """Which TOFU forget split, and how many authors the embedded data has."""

    forget_split: str = field(
        default="forget10", metadata={"help": "The forget split: forget01, forget05 or forget10."}
    )
    num_authors: int = field(default=200, metadata={"help": "Authors in the embedded data."})


@dataclass(kw_only=True)
class TofuPromptOptions:
    """How a TOFU question and its answer are put to the model."""

    template: str = field(
        default="auto",
        metadata={"help": "Prompt format: chat (the tokenizer's chat template), plain (Question/Answer), auto."},
    )
    system_prompt: str | None = field(
        default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "Chat template: the system prompt ('' for none)."}
    )
    date_string: str | None = field(
        default=DEFAULT_DATE_STRING, metadata={"help": "Chat template: the date_string variable ('' for none)."}
    )
    max_length: int = field(
        default=DEFAULT_MAX_LENGTH, metadata={"help": "Longest encoded question + answer (tokens)."}
    )


@dataclass(kw_only=True)
class TofuDataOptions(TofuSplitOptions, TofuPromptOptions):
    """Which TOFU data, and how a question and its answer are put to the model."""

    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "TOFU data: tofu ($FORGETFUL_DATA/tofu, else locuslab/TOFU from the Hub), a folder of "
            "<split>.json files, a Hub name, or unset for the embedded data."
        },
    )

    def check_data_options(self) -> None:
        if self.forget_split not in FORGET_SPLITS:
            raise ForgetfulError(f"forget split must be one of {', '.join(FORGET_SPLITS)}, got '{self.forget_split}'")
        if self.template not in TEMPLATE_KINDS:
            raise ForgetfulError(f"template must be one of {', '.join(TEMPLATE_KINDS)}, got '{self.template}'")

    def tofu_template(self) -> TofuTemplate:
        return TofuTemplate(kind=self.template, system_prompt=self.system_prompt, date_string=self.date_string)


@dataclass(kw_only=True)
class TofuEvalOptions:
    """How the TOFU suite evaluates a model."""

    max_new_tokens: int = field(default=200, metadata={"help": "Longest greedy answer generated (for ROUGE)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Evaluation batch size (scoring and generation)."})
    max_eval_examples: int | None = field(
        default=None,
        metadata={"help": "Evaluate at most this many rows per set.", "aliases": ["--max-examples", "--max_examples"]},
    )

    def check_eval_options(self) -> None:
        if self.max_new_tokens < 1 or self.eval_batch_size < 1:
            raise ForgetfulError("max_new_tokens and eval_batch_size must be positive")


def copy_options(target: type, source, **extra):
    """``target`` built from the fields of ``source`` that it shares (the option groups), ``extra``
    overriding them."""
    names = {f.name for f in fields(target) if f.init}
    return target(**{**{n: getattr(source, n) for n in names if hasattr(source, n)}, **extra})
