"""User-facing errors.

Anything a user can fix (a missing file, a bad config value, an unreachable hub) raises
:class:`ForgetfulError`. The CLI prints it as one line on stderr and exits with code 2; library
callers can catch it as a ``ValueError``.
"""

from __future__ import annotations

import os
from pathlib import Path


class ForgetfulError(ValueError):
    """A problem with the user's input or environment, with a message that names the fix."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after ``step`` optimizer steps; ``checkpoint`` is the folder
    written at that step (None when the run has nowhere to save)."""

    def __init__(self, step: int, checkpoint: str | None):
        self.step, self.checkpoint = step, checkpoint
        where = f"; checkpoint saved in {checkpoint}, run again with --resume to continue" if checkpoint else ""
        super().__init__(f"interrupted after step {step}{where}")


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise a clear error if it is missing, a folder, or empty."""
    p = Path(path)
    if not p.exists():
        raise ForgetfulError(f"{what} not found: {p}")
    if p.is_dir():
        raise ForgetfulError(f"{what} is a folder, expected a file: {p}")
    if p.stat().st_size == 0:
        raise ForgetfulError(f"{what} is empty: {p}")
    return p


def check_probability(name: str, value: float, *, allow_one: bool = False) -> float:
    """Check that ``value`` lies in [0, 1) (or [0, 1] with ``allow_one``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ForgetfulError(f"{name} must be a number in [0, 1), got {value!r}") from None
    upper_ok = v <= 1.0 if allow_one else v < 1.0
    if not (v >= 0.0 and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ForgetfulError(f"{name} must lie in {interval}, got {value!r}")
    return v


def check_choices(config) -> None:
    """Check every ``Literal[...]`` field of a config dataclass. On the command line these are
    argparse choices; library callers who build the dataclass themselves are checked here."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        tp = hints.get(f.name)
        options = [tp] + list(typing.get_args(tp)) if typing.get_origin(tp) is not typing.Literal else [tp]
        literals = [a for a in options if typing.get_origin(a) is typing.Literal]
        if not literals:
            continue
        allowed = typing.get_args(literals[0])
        value = getattr(config, f.name)
        if value not in allowed and not (value is None and type(None) in typing.get_args(tp)):
            raise ForgetfulError(f"{f.name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
