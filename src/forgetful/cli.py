"""The ``forgetful`` command.

``forgetful <command> [--config FILE.yaml] [--flag value ...]``. Each command's options are a
dataclass, parsed with ``HfArgumentParser`` (flags take ``--with-dashes`` or ``--with_underscores``);
a YAML config gives defaults that flags override. A problem the user can fix prints one line on
stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import types
import typing
from pathlib import Path

from .errors import ForgetfulError
from .interrupts import TrainingInterrupted

# command -> (module, arguments dataclass, run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": ("forgetful.demo", "DemoArguments", "run_demo",
             "Run everything at small scale on the embedded data, offline; writes report.md, results.json, plots."),
    "pretrain": ("forgetful.pretrain", "PretrainArguments", "run_pretrain",
                 "Train a base causal LM (built-in tiny configs or any HF model)."),
    "train-forget": ("forgetful.reinforce", "TrainForgetArguments", "run_train_forget",
                     "Train a forget-mask policy (and the LM) with REINFORCE."),
    "eval-forget": ("forgetful.evaluation", "EvalForgetArguments", "run_eval_forget",
                    "Evaluate forgetting strategies: quality, FLOPs, time and memory per keep ratio."),
    "train-selective": ("forgetful.selective_cli", "CLI_ARGUMENTS", "run_train_selective",
                        "Train with per-token loss masks (SelectiveLossTrainer) on a registered task."),
    "eval-tofu": ("forgetful.tofu_eval", "EvalTofuArguments", "run_eval_tofu",
                  "Score a model with the TOFU metrics (forget quality, model utility, ...)."),
    "tofu-experiment": ("forgetful.tofu_experiment", "TofuExperimentArguments", "run_tofu_experiment",
                        "Train full / retain / masked models from one initialisation, evaluate all, plot."),
    "generate-data": ("forgetful.generate", "GenerateDataArguments", "run_generate_data",
                      "Write the embedded data (corpus, forgetting examples, TOFU splits) to files."),
}


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one-line ForgetfulErrors."""

    def error(self, message: str):  # noqa: D102
        raise ForgetfulError(f"{self.prog}: {message}")


def _hf_parser(cls: type, prog: str, description: str):
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str):
            raise ForgetfulError(f"{prog}: {message}")

    return Parser(cls, prog=prog, description=description)


def _field_types(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


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
    for cls in classes:
        types_by_field.update(_field_types(cls))
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types_by_field:
            close = [f for f in types_by_field if f.startswith(name[:4])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ForgetfulError(f"unknown config key '{key}' in {p}{hint}")
        out[name] = _coerce(name, types_by_field[name], value)
    return out


def parse_command(command: str, argv: list[str]):
    module_name, cls_name, fn_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    classes = cls if isinstance(cls, tuple) else (cls,)
    parser = _hf_parser(classes if len(classes) > 1 else classes[0], f"forgetful {command}", help_text)
    parser.add_argument("--config", default=None, help="YAML file of option: value defaults (flags override).")
    pre = _Parser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
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
    args = [a for a in parsed if not isinstance(a, argparse.Namespace)]
    return getattr(module, fn_name), args


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    # We turn every user error into one line; the libraries' own error logs would repeat it with a traceback.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(len(c) for c in COMMANDS)
        print("usage: forgetful <command> [--config FILE.yaml] [options]\n\ncommands:")
        for name, (*_, help_text) in COMMANDS.items():
            print(f"  {name.ljust(width)}  {help_text}")
        print("\n`forgetful <command> --help` lists a command's options.")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise ForgetfulError(f"unknown command '{command}'; commands: {', '.join(COMMANDS)}")
        _quiet_libraries()
        run, args = parse_command(command, rest)
        run(*args)
    except ForgetfulError as exc:
        msg = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"forgetful: error: {msg}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"forgetful: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("forgetful: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Under a launcher the command owns the process group: close it before the process exits."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
