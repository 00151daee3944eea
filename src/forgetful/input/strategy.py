"""The one grammar for naming a strategy, shared by ``eval-forget``, ``forget-experiment`` and the
Python API (:func:`~forgetful.input.policies.build_mask`)::

    name[:key=value,...][@unit]

``name`` is a registered policy (``recency``, ``lexical``, ``snapkv``, ``oracle``, ``residual``, ...)
or the folder of a saved learned policy; the options are that policy's constructor arguments, plus
``forget_layer`` (any strategy: layers ``1..L`` read the whole row, the later ones only the kept
tokens); ``@unit`` says what is kept whole (``token``, ``sentence``, ``task``, ``chunk:N``).
Examples: ``snapkv:layer=4@sentence``, ``recency:forget_layer=8``, ``lexical:rounds=2@task``,
``gemfilter:layer=12``, ``runs/x/policy:forget_layer=4``.

Values are read as ``true``/``false``, integers, numbers, or text; ``a|b|c`` is a list
(``attention_score:layers=0|1|2``). The canonical spelling (:meth:`StrategySpec.__str__`) sorts the
options, so one strategy has one name in every table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ForgetfulError
from .units import check_unit

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _value(text: str):
    """One option value: a bool, an int, a float, a ``|``-separated list of those, or the text."""
    if "|" in text:
        return tuple(_value(part) for part in text.split("|") if part != "")
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _spell(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "|".join(_spell(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class StrategySpec:
    """A parsed strategy: a registered ``name`` or a saved policy's folder (``path``), its options
    (sorted ``(key, value)`` pairs) and its unit."""

    name: str
    options: tuple[tuple[str, object], ...] = ()
    unit: str = "token"
    path: str | None = None

    @property
    def kwargs(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options}

    def __str__(self) -> str:
        head = self.path if self.path is not None else self.name
        if self.options:
            head += ":" + ",".join(f"{k}={_spell(v)}" for k, v in self.options)
        return head if self.unit == "token" else f"{head}@{self.unit}"

    def with_options(self, **options) -> StrategySpec:
        """The same strategy with ``options`` added (or replaced)."""
        merged = {**dict(self.options), **options}
        return StrategySpec(self.name, tuple(sorted(merged.items())), self.unit, self.path)

    def without(self, *keys: str) -> StrategySpec:
        return StrategySpec(self.name, tuple((k, v) for k, v in self.options if k not in keys), self.unit, self.path)


def parse_strategy(text: str | StrategySpec) -> StrategySpec:
    """``"snapkv:layer=4@sentence"`` -> ``StrategySpec("snapkv", (("layer", 4),), "sentence")``; one
    clear error for a malformed name, option or unit. A name that is an existing folder holding a
    saved policy (``policy_config.json``) is that policy (``path``)."""
    if isinstance(text, StrategySpec):
        return text
    spec = str(text).strip()
    if not spec:
        raise ForgetfulError("an empty strategy name; write name[:key=value,...][@unit], e.g. recency@sentence")
    head, at, unit = spec.partition("@")
    if at and not unit:
        raise ForgetfulError(f"strategy '{spec}': nothing after '@'; write name@unit (token, sentence, task, chunk:N)")
    unit = check_unit(unit) if unit else "token"
    name, colon, opts = head, "", ""
    if not (Path(head) / "policy_config.json").is_file():
        name, colon, opts = head.partition(":")
    options: dict[str, object] = {}
    if colon and not opts:
        raise ForgetfulError(f"strategy '{spec}': nothing after ':'; write name:key=value,... (e.g. snapkv:layer=4)")
    for part in opts.split(",") if opts else []:
        key, eq, raw = part.strip().partition("=")
        if not eq or not _KEY.match(key) or raw == "":
            raise ForgetfulError(f"strategy '{spec}': option '{part}' is not key=value (e.g. forget_layer=8)")
        if key in options:
            raise ForgetfulError(f"strategy '{spec}': option '{key}' given twice")
        options[key] = _value(raw)
    if (Path(name) / "policy_config.json").is_file():
        return StrategySpec("", tuple(sorted(options.items())), unit, name)
    if name == "oracle" and unit == "token":
        raise ForgetfulError(
            f"strategy '{spec}': the oracle searches over units (token-level search takes n x n forwards): use "
            "oracle@sentence, oracle@task or oracle@chunk:N"
        )
    if not _NAME.match(name):
        hint = " (a saved policy folder needs policy_config.json)" if "/" in name else ""
        raise ForgetfulError(f"strategy '{spec}': '{name}' is not a strategy name{hint}")
    return StrategySpec(name, tuple(sorted(options.items())), unit)


def split_strategies(text: str) -> list[str]:
    """A comma-separated list of strategies, where options also use commas: a new strategy starts
    at a part that is not ``key=value`` (``"snapkv:layer=4,window=8@sentence,recency"`` is two)."""
    out: list[str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        key = part.split("@")[0]
        if out and "=" in key and ":" not in key and "/" not in key and ":" in out[-1].split("@")[0]:
            if "@" in out[-1]:
                raise ForgetfulError(f"strategy '{out[-1]}' ends with @unit, so '{part}' cannot be one of its options")
            out[-1] += "," + part
        else:
            out.append(part)
    return out
