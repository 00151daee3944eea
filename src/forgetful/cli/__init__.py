"""The ``forgetful`` command.

``forgetful <command> [--config FILE.yaml] [--flag value ...]``. Each command is one thin module
here: its options are the library's config dataclasses (plus the command's own arguments), parsed
with ``HfArgumentParser`` (:mod:`.parsing`); it calls the library and prints. A problem the user
can fix prints one line on stderr and exits with code 2. Library code never imports this package.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from ..errors import ForgetfulError, TrainingInterrupted
from .parsing import parse_command_line

# command -> (module under forgetful.cli with ARGUMENTS and run(), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "demo",
        "Run everything at small scale on the embedded data, offline; writes report.md, results.json, plots.",
    ),
    "pretrain": ("pretrain", "Train a base causal LM (built-in tiny configs or any HF model)."),
    "train-forget": ("train_forget", "Train a forget-mask policy (and the LM) with REINFORCE."),
    "eval-forget": ("eval_forget", "Evaluate forgetting strategies: quality, FLOPs, time and memory per keep ratio."),
    "forget-experiment": (
        "forget_experiment",
        "Input forgetting under the fair protocol: zero-shot and per-strategy finetuned LMs, learned policies.",
    ),
    "train-selective": (
        "train_selective",
        "Train with per-token loss masks (SelectiveLossTrainer) on a registered task.",
    ),
    "eval-tofu": ("eval_tofu", "Score a model with the TOFU metrics (forget quality, model utility, ...)."),
    "unlearn": ("unlearn", "Post-hoc unlearning of a TOFU forget split: grad_ascent, grad_diff, npo, simnpo or rmu."),
    "tofu-experiment": (
        "tofu_experiment",
        "Train full / retain / masked models from one initialisation, unlearn from full, evaluate all, plot.",
    ),
    "generate-data": ("generate_data", "Write the embedded data (corpus, forgetting examples, TOFU splits) to files."),
}


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
        module_name, help_text = COMMANDS[command]
        module = importlib.import_module(f"{__name__}.{module_name}")
        options, given = parse_command_line(command, module.ARGUMENTS, rest, help_text)
        _model_loading_bars(options)
        # a command whose defaults depend on other options (tofu-experiment's recipe) takes the options the user set
        takes_given = "given" in inspect.signature(module.run).parameters
        module.run(*options, **({"given": given} if takes_given else {}))
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


def _model_loading_bars(options) -> None:
    """``--disable-tqdm true`` silences transformers' own bars too ("Loading weights" of every
    ``from_pretrained``), not only the training loop's: a log in a file gets none of them."""
    from transformers.utils import logging

    if any(getattr(o, "disable_tqdm", False) for o in options):
        logging.disable_progress_bar()
    else:
        logging.enable_progress_bar()


def _close_process_group() -> None:
    """Under a launcher the command owns the process group: close it before the process exits."""
    from forgetful.training.distributed import close_process_group

    close_process_group()


if __name__ == "__main__":
    sys.exit(main())
