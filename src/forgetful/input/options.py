"""Options that several input-forgetting commands share, each declared once: the budget - one name,
``keep_ratio`` (the share of the context kept; ``--keep`` on the command line), one default
(:data:`DEFAULT_KEEP_RATIO`); only the seed's public functions (``reinforce_model``,
``two_step_reinforce_model``, ``create_random_forgetting_mask``) take the share forgotten instead,
converted once at that boundary - and how text is cut into windows (:class:`TextWindowOptions`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ForgetfulError

#: the share of the context kept when nothing says otherwise (every command, the trainer, the seed's
#: ``reinforce_model``, the demo)
DEFAULT_KEEP_RATIO = 0.5


def parse_keep(text: str | float | list, *, allow_one: bool = True) -> list[float]:
    """Keep ratios from ``"0.5,0.25"`` (or one number, or a list), each in (0, 1] ((0, 1) without
    ``allow_one``), largest first, without repeats."""
    if isinstance(text, int | float):
        parts = [text]
    else:
        parts = text if isinstance(text, list) else [p for p in str(text).split(",") if p.strip()]
    try:
        ratios = [float(p) for p in parts]
    except ValueError:
        raise ForgetfulError(f"keep must be numbers like 0.5 or 1,0.75,0.5, got {text!r}") from None
    top = "1]" if allow_one else "1)"
    if not ratios or any(not (0 < r <= 1 if allow_one else 0 < r < 1) for r in ratios):
        raise ForgetfulError(f"keep ratios must lie in (0, {top}, got {text!r}")
    return sorted(set(ratios), reverse=True)


@dataclass(kw_only=True)
class TextWindowOptions:
    """How a text file becomes input-forgetting examples: windows of ``context_length`` tokens
    followed by ``target_length`` target tokens, ``stride`` apart."""

    context_length: int = field(default=256, metadata={"help": "Text: context tokens per window (n)."})
    target_length: int = field(default=32, metadata={"help": "Text: target tokens per window (m)."})
    stride: int | None = field(
        default=None, metadata={"help": "Text: tokens between window starts (default n + m: no overlap)."}
    )

    def window_options(self) -> dict:
        return {"context_length": self.context_length, "target_length": self.target_length, "stride": self.stride}
