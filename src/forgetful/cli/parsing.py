"""Parsing a command's options: ``HfArgumentParser`` over the command's dataclasses (flags take
``--with-dashes`` or ``--with_underscores``), a YAML config of defaults that flags override
(unknown keys and wrong types refused with one line), and argparse errors as one-line
:class:`~forgetful.errors.ForgetfulError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from ..errors import ForgetfulError


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one-line ForgetfulErrors."""

    def error(self, message: str):  # noqa: D102
        raise ForgetfulError(f"{self.prog}: {message}")


def hf_parser(cls: type, prog: str, description: str):
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str):
            raise ForgetfulError(f"{prog}: {message}")

    return Parser(cls, prog=prog, description=description)


def _field_types(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _field_aliases(cls: type) -> dict[str, str]:
    """Flag aliases (``--out`` for ``output_dir``) as config keys, mapped to their field."""
    out = {}
    for f in dataclasses.fields(cls):
        aliases = f.metadata.get("aliases", [])
        for alias in [aliases] if isinstance(aliases, str) else aliases:
            out[alias.lstrip("-").replace("-", "_")] = f.name
    return out


def _coerce(name: str, tp, value):
    """Check/convert one config value to the field's type; clear error if it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _coerce(name, a, value)
            except ForgetfulError as e:
                errors.append(str(e))
        raise ForgetfulError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ForgetfulError(f"config key '{name}' must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(name, args[0] if args else str, v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ForgetfulError(f"config key '{name}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ForgetfulError(f"config key '{name}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ForgetfulError(f"config key '{name}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ForgetfulError(f"config key '{name}' must be a string, got {value!r}")
        return str(value)
    return value  # types we do not check (dicts, enums of TrainingArguments) go to the dataclass


def load_config(path: str, classes: tuple[type, ...]) -> dict:
    """Read a YAML config; every key must be a field of one of ``classes`` and fit its type."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ForgetfulError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ForgetfulError(f"config file {p} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ForgetfulError(f"config file {p} must be a mapping of option: value, got {type(data).__name__}")
    types_by_field: dict[str, object] = {}
    aliases: dict[str, str] = {}
    for cls in classes:
        types_by_field.update(_field_types(cls))
        aliases.update(_field_aliases(cls))
    out = {}
    renamed = renamed_options(classes)
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = aliases.get(name, name)
        if name in renamed:  # a key of an earlier release: read as its new name
            new, convert = renamed[name]
            converted = convert(value) if convert is not None else value
            _notice(name, new, value, converted)
            name, value = new, converted
            if isinstance(value, str) and types_by_field.get(name) in (bool, bool | None, float, float | None):
                value = yaml.safe_load(value)
        if name not in types_by_field:
            close = [f for f in types_by_field if f.startswith(name[:4])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ForgetfulError(f"unknown config key '{key}' in {p}{hint}")
        out[name] = _coerce(name, types_by_field[name], value)
    return out


def _share_kept(value: str) -> str:
    """``--forget-p 0.5,0.75`` (shares forgotten) as ``--keep`` values (shares kept)."""
    try:
        return ",".join(f"{1 - float(v):g}" for v in str(value).split(",") if v.strip())
    except ValueError:
        raise ForgetfulError(f"--forget-p takes shares of the context forgotten, like 0.5, got {value!r}") from None


#: options of earlier releases -> (their name now, how a value converts; None: as it is); a renamed
#: option is read as its new name, with a one-line notice, wherever the command has the new name and
#: not the old one (flags and config keys alike)
RENAMED_OPTIONS = {
    "forget_p": ("keep", _share_kept),
    "lm_learning_rate": ("learning_rate", None),
    "per_device_batch_size": ("per_device_train_batch_size", None),
    "resume": ("resume_from_checkpoint", None),
    "mixed_precision": ("bf16", lambda v: {"bf16": "true", "no": "false"}.get(str(v), str(v))),
    "hidden_size": ("policy_hidden_size", None),
    "kernel_size": ("policy_kernel_size", None),
    "cell": ("policy_cell", None),
}


def _notice(old: str, new: str, value, converted) -> None:
    import sys

    shown = "" if value is None else f" {value}"
    read = "" if value is None else f" {converted}"
    print(f"forgetful: note: --{old.replace('_', '-')}{shown} is now --{new.replace('_', '-')}{read}", file=sys.stderr)


def renamed_options(classes: tuple[type, ...]) -> dict[str, tuple[str, object]]:
    """The renamed options that apply to a command made of ``classes``."""
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {old: rule for old, rule in RENAMED_OPTIONS.items() if old not in names and rule[0] in names}


def rename_flags(argv: list[str], classes: tuple[type, ...]) -> list[str]:
    """``argv`` with the flags of earlier releases spelled as now (a notice for each)."""
    rules = renamed_options(classes)
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, inline = arg.partition("=")
        key = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if key not in rules:
            out.append(arg)
            i += 1
            continue
        new, convert = rules[key]
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None)
        converted = convert(value) if convert is not None and value is not None else value
        _notice(key, new, value, converted)
        out += [f"--{new}"] + ([converted] if value is not None else [])
        i += 1 if eq or value is None else 2
    return out


def parse_command_line(
    command: str, classes: tuple[type, ...], argv: list[str], help_text: str = ""
) -> tuple[list, frozenset[str]]:
    """Instances of ``classes`` from the command line ``argv`` (and its ``--config`` YAML), and the
    names of the fields the user set there (a flag, under any of its spellings, or a config key):
    a command whose defaults depend on other options (``tofu-experiment``'s recipe) leaves those alone.
    Options of earlier releases (:data:`RENAMED_OPTIONS`) are read as their new names, with a notice."""
    argv = rename_flags(list(argv), classes)
    parser = hf_parser(classes if len(classes) > 1 else classes[0], f"forgetful {command}", help_text)
    parser.add_argument("--config", default=None, help="YAML file of option: value defaults (flags override).")
    pre = _Parser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    values = {}
    if known.config:
        values = load_config(known.config, classes)
        parser.set_defaults(**values)
        for action in parser._actions:  # options given by the config are no longer required flags
            if action.dest in values:
                action.required = False
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except (TypeError, ValueError) as exc:  # raised by dataclass __post_init__ checks
        if isinstance(exc, ForgetfulError):
            raise
        raise ForgetfulError(f"forgetful {command}: {str(exc).splitlines()[0]}") from None
    return [a for a in parsed if not isinstance(a, argparse.Namespace)], _flags_given(parser, argv) | set(values)


def parse_options(command: str, classes: tuple[type, ...], argv: list[str], help_text: str = "") -> list:
    """Instances of ``classes`` from the command line ``argv`` (and its ``--config`` YAML)."""
    return parse_command_line(command, classes, argv, help_text)[0]


def _flags_given(parser: argparse.ArgumentParser, argv: list[str]) -> frozenset[str]:
    """The fields named by flags in ``argv``, as argparse itself reads them (aliases, both spellings,
    ``--flag=value``, ``--no_flag``): ``argv`` parsed again with every default suppressed, so only
    what it sets is there. Call it after the real parse: it changes the parser's defaults."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    parser._defaults.clear()
    namespace, _ = parser.parse_known_args(argv)
    return frozenset(vars(namespace)) - {"config"}
