"""Each command's options are the library's config dataclasses: the flags, their short aliases, YAML
configs (aliases included) and the defaults a command gives the library's training options."""

from __future__ import annotations

import importlib
import re

import pytest

from forgetful.cli import COMMANDS
from forgetful.cli.parsing import parse_command_line, parse_options
from forgetful.errors import ForgetfulError
from forgetful.input.reinforce import ForgetTrainingConfig
from forgetful.loss.pretrain import PretrainTrainingArguments
from forgetful.tofu.experiment import TofuTrainingArguments


def _arguments(command: str) -> tuple[type, ...]:
    return importlib.import_module(f"forgetful.cli.{COMMANDS[command][0]}").ARGUMENTS


def _parse(command: str, argv: list[str]):
    return parse_options(command, _arguments(command), argv)


def test_train_forget_flags_fill_the_training_config():
    args, config = _parse(
        "train-forget",
        [
            "--model",
            "m",
            "--out",
            "o",
            "--batch-size",
            "3",
            "--mode",
            "bernoulli",
            "--num_samples",
            "5",
            "--keep",
            "0.75",
        ],
    )
    assert isinstance(config, ForgetTrainingConfig)
    assert (config.output_dir, config.per_device_train_batch_size, config.mode, config.num_samples) == (
        "o",
        3,
        "bernoulli",
        5,
    )
    assert args.keep == 0.75 and args.model == "m"
    # the long names work too
    _, config = _parse("train-forget", ["--model", "m", "--output_dir", "o2", "--per_device_train_batch_size", "7"])
    assert (config.output_dir, config.per_device_train_batch_size) == ("o2", 7)


def test_choices_are_checked_on_the_command_line_and_in_the_library():
    with pytest.raises(ForgetfulError, match="invalid choice"):
        _parse("train-forget", ["--model", "m", "--out", "o", "--mode", "topk"])
    with pytest.raises(ForgetfulError, match="mode must be one of exact, bernoulli, got 'topk'"):
        ForgetTrainingConfig(mode="topk")
    with pytest.raises(ForgetfulError, match="bf16 and fp16 together"):
        ForgetTrainingConfig(bf16=True, fp16=True)
    assert ForgetTrainingConfig().bf16 is None


def test_yaml_config_takes_field_names_and_flag_aliases(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\nout: from-yaml\nbatch-size: 4\nentropy_coef: 0.5\n")
    args, config = _parse("train-forget", ["--config", str(cfg)])
    assert (args.model, config.output_dir, config.per_device_train_batch_size, config.entropy_coef) == (
        "m",
        "from-yaml",
        4,
        0.5,
    )
    _, config = _parse("train-forget", ["--config", str(cfg), "--batch-size", "9"])  # flags override the file
    assert config.per_device_train_batch_size == 9


def test_pretrain_training_defaults_and_short_flags(tmp_path):
    _, t = _parse("pretrain", ["--out", str(tmp_path)])
    assert isinstance(t, PretrainTrainingArguments)
    assert (t.per_device_train_batch_size, t.per_device_eval_batch_size, t.learning_rate) == (32, 32, 1e-3)
    assert (t.lr_scheduler_type.value, t.warmup_steps, t.num_train_epochs) == ("cosine", 0.05, 1.0)
    assert (t.save_strategy.value, t.save_total_limit, t.logging_steps, t.data_seed) == ("no", 2, 20, 0)
    _, t = _parse(
        "pretrain",
        [
            "--out",
            str(tmp_path),
            "--batch-size",
            "8",
            "--epochs",
            "2",
            "--warmup-ratio",
            "0.1",
            "--save-steps",
            "5",
            "--seed",
            "3",
        ],
    )
    assert (t.per_device_train_batch_size, t.per_device_eval_batch_size, t.num_train_epochs) == (8, 8, 2.0)
    assert (t.warmup_steps, t.save_strategy.value, t.save_steps, t.data_seed) == (0.1, "steps", 5, 3)


def test_tofu_experiment_recipe_defaults():
    _, t = _parse("tofu-experiment", ["--model", "m", "--out", "o", "--epochs", "2", "--batch-size", "4"])
    assert isinstance(t, TofuTrainingArguments)
    assert (t.num_train_epochs, t.per_device_train_batch_size, t.learning_rate) == (2.0, 4, 1e-5)
    # open-unlearning's TOFU finetuning recipe
    assert (t.gradient_accumulation_steps, t.warmup_epochs, t.loss_average) == (4, 1.0, "micro_batch")
    assert (t.lr_scheduler_type.value, t.weight_decay, t.save_strategy.value) == ("linear", 0.01, "no")
    _, t = _parse("tofu-experiment", ["--model", "m", "--out", "o"])
    assert (t.num_train_epochs, t.per_device_train_batch_size * t.gradient_accumulation_steps) == (5.0, 32)


def _tofu_recipe(argv: list[str]):
    """tofu-experiment's training options after its recipe, as the command resolves them, and the record."""
    from forgetful.tofu.recipes import apply_recipe

    (config, training), given = parse_command_line("tofu-experiment", _arguments("tofu-experiment"), argv)
    record = apply_recipe(training, config.recipe, config.model, given)
    steps = (training.per_device_train_batch_size, training.gradient_accumulation_steps)
    return (training.learning_rate, training.num_train_epochs, steps, training.weight_decay), record


def test_tofu_experiment_recipe_auto_picks_by_model():
    values, record = _tofu_recipe(["--model", "smollm2-135m", "--out", "o"])
    assert values == (1e-4, 5.0, (32, 1), 0.01)
    assert (record["asked"], record["name"], record["overridden"]) == ("auto", "smollm2", {})
    values, record = _tofu_recipe(["--model", "HuggingFaceTB/SmolLM2-360M", "--out", "o"])
    assert values == (1e-5, 5.0, (8, 4), 0.01) and record["name"] == "open_unlearning"
    # named, a recipe holds for any model
    values, record = _tofu_recipe(["--model", "smollm2-135m", "--out", "o", "--recipe", "open_unlearning"])
    assert values == (1e-5, 5.0, (8, 4), 0.01) and (record["asked"], record["name"]) == ("open_unlearning",) * 2
    values, _ = _tofu_recipe(["--model", "gpt2", "--out", "o", "--recipe", "smollm2"])
    assert values == (1e-4, 5.0, (32, 1), 0.01)


def test_tofu_experiment_options_set_by_the_user_win_over_the_recipe(tmp_path):
    # 1e-5 is open-unlearning's default: set on the command line it still wins over smollm2's 1e-4
    values, record = _tofu_recipe(["--model", "smollm2-135m", "--out", "o", "--learning-rate", "1e-5"])
    assert values == (1e-5, 5.0, (32, 1), 0.01) and record["overridden"] == {"learning_rate": 1e-5}
    # any spelling of a flag: aliases, underscores, --flag=value
    values, record = _tofu_recipe(["--model", "smollm2-135m", "--out", "o", "--epochs=3", "--batch_size", "16"])
    assert values == (1e-4, 3.0, (16, 1), 0.01)
    assert record["overridden"] == {"num_train_epochs": 3.0, "per_device_train_batch_size": 16}
    # a config key is the user's too, and a flag over it as well
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: smollm2-135m\nout: o\nlearning_rate: 1.0e-4\ngradient-accumulation-steps: 4\n")
    values, record = _tofu_recipe(["--config", str(cfg), "--recipe", "open_unlearning"])
    assert values == (1e-4, 5.0, (8, 4), 0.01) and record["overridden"] == {"learning_rate": 1e-4}
    values, _ = _tofu_recipe(["--config", str(cfg), "--learning_rate", "2e-5"])
    assert values == (2e-5, 5.0, (32, 4), 0.01)


def test_the_parser_reports_the_options_given():
    argv = ["--model", "m", "--out", "o", "--batch-size", "4", "--no_sparse_logits", "--bf16", "false"]
    _, given = parse_command_line("tofu-experiment", _arguments("tofu-experiment"), argv)
    assert given == {"model", "out", "per_device_train_batch_size", "sparse_logits", "bf16"}


def test_an_unknown_tofu_recipe_names_the_choices():
    with pytest.raises(ForgetfulError, match="recipe must be one of auto, open_unlearning, smollm2, demo, got 'fast'"):
        _tofu_recipe(["--model", "m", "--out", "o", "--recipe", "fast"])


def test_every_command_parses_its_help(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as info:
            _parse(command, ["--help"])
        assert info.value.code == 0
        assert "--config" in capsys.readouterr().out


def test_every_option_of_every_command_has_help():
    import importlib

    from forgetful.cli import COMMANDS
    from forgetful.cli.parsing import hf_parser

    missing = []
    for command, (module, _) in COMMANDS.items():
        classes = importlib.import_module(f"forgetful.cli.{module}").ARGUMENTS
        parser = hf_parser(classes if len(classes) > 1 else classes[0], command, "")
        missing += [f"{command} {a.option_strings[0]}" for a in parser._actions if a.dest != "help" and not a.help]
    assert not missing


def test_the_command_list_loads_no_torch():
    """`forgetful --help` answers at once: listing the commands imports neither torch nor transformers."""
    import subprocess
    import sys

    code = "import sys, forgetful.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_flags_of_earlier_releases_are_read_as_their_new_names_with_a_notice(capsys, tmp_path):
    """``train-forget --forget-p 0.5`` (the flag of earlier releases) runs as ``--keep 0.5``, and
    says so in one line per flag; a YAML key of the old name too; a command that still has the
    old name keeps it."""
    from forgetful.cli import forget_experiment, train_forget, train_selective
    from forgetful.cli.parsing import parse_command_line

    argv = ["--model", "m", "--out", "o", "--forget-p", "0.25", "--lm-learning-rate=3e-4", "--mixed-precision", "no"]
    (args, config), given = parse_command_line("train-forget", train_forget.ARGUMENTS, argv + ["--resume"])
    assert (args.keep, config.learning_rate, config.bf16, config.resume_from_checkpoint) == (0.75, 3e-4, False, True)
    assert {"keep", "learning_rate", "bf16", "resume_from_checkpoint"} <= given
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        "forgetful: note: --forget-p 0.25 is now --keep 0.75",
        "forgetful: note: --lm-learning-rate 3e-4 is now --learning-rate 3e-4",
        "forgetful: note: --mixed-precision no is now --bf16 false",
        "forgetful: note: --resume is now --resume-from-checkpoint",
    ]
    (exp, _, _, _), _ = parse_command_line(
        "forget-experiment", forget_experiment.ARGUMENTS, ["--model", "m", "--forget-p", "0.5,0.75"]
    )
    assert exp.keep == "0.5,0.25"
    config_file = tmp_path / "old.yaml"
    config_file.write_text("model: m\nout: o\nforget_p: 0.5\nper_device_batch_size: 3\nhidden_size: 8\n")
    (args, config), _ = parse_command_line("train-forget", train_forget.ARGUMENTS, ["--config", str(config_file)])
    assert (args.keep, config.per_device_train_batch_size, args.policy_hidden_size) == (0.5, 3, 8)
    assert "per-device-batch-size 3 is now --per-device-train-batch-size 3" in capsys.readouterr().err
    # train-selective has a --resume of its own: read as it is, no notice
    _, given = parse_command_line(
        "train-selective", train_selective.ARGUMENTS, ["--task", "tofu", "--model", "m", "--out", "o", "--resume"]
    )
    assert "resume" in given and capsys.readouterr().err == ""
    with pytest.raises(ForgetfulError, match="--forget-p takes shares of the context forgotten"):
        parse_command_line("train-forget", train_forget.ARGUMENTS, ["--model", "m", "--forget-p", "half"])


SPECIAL = re.compile(r"(?:^|[(;,] ?)(-?\d+(?:\.\d+)?(?:e-?\d+)?|none|'')(?: or (-?\d+))?: ")


def _minimal_argv(classes) -> list[str]:
    """The required flags of a command with a placeholder value each."""
    import dataclasses

    argv = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                argv += [f"--{f.name}", "tofu" if f.name == "task" else "m"]
    return argv


def test_every_special_value_a_help_text_names_is_accepted():
    """A help text that says what a value means ("0: no timing", "(0: none)") is taken at its word:
    each such value, fed back to its command, parses."""
    import dataclasses
    import importlib

    from forgetful.cli import COMMANDS
    from forgetful.cli.parsing import parse_options

    checked = []
    for command, (module_name, _) in COMMANDS.items():
        classes = importlib.import_module(f"forgetful.cli.{module_name}").ARGUMENTS
        for cls in classes:
            if cls.__module__.startswith("transformers"):
                continue
            for f in dataclasses.fields(cls):
                text = f.metadata.get("help", "") if f.init else ""
                for match in SPECIAL.finditer(text):
                    for value in filter(None, match.groups()):
                        value = "" if value == "''" else value
                        parse_options(command, classes, _minimal_argv(classes) + [f"--{f.name}", value])
                        checked.append((command, f.name, value))
    assert ("eval-forget", "timing_repeats", "0") in checked and len(checked) >= 10


def test_both_commands_take_the_same_strategy_strings():
    """``eval-forget --strategies`` and ``forget-experiment --zero-shot`` read one grammar
    (name[:key=value,...][@unit]) and refuse the same mistakes."""
    from forgetful.cli import eval_forget, forget_experiment
    from forgetful.cli.parsing import parse_options

    spec = "recency@sentence,snapkv:layer=1,window=8@sentence,lexical:rounds=2@chunk:4,recency:forget_layer=2"
    (ev,) = parse_options("eval-forget", eval_forget.ARGUMENTS, ["--model", "m", "--out", "o", "--strategies", spec])
    exp = parse_options("forget-experiment", forget_experiment.ARGUMENTS, ["--model", "m", "--zero-shot", spec])[0]
    expected = [
        "recency@sentence",
        "snapkv:layer=1,window=8@sentence",
        "lexical:rounds=2@chunk:4",
        "recency:forget_layer=2",
    ]
    assert ev.strategy_names == expected and exp.strategies("zero_shot") == expected
    for bad, message in (
        ("recency@page", "unknown unit 'page'"),
        ("residual", "not learned"),
        ("oracle", "over units"),
    ):
        with pytest.raises(ForgetfulError, match=message):
            parse_options("eval-forget", eval_forget.ARGUMENTS, ["--model", "m", "--out", "o", "--strategies", bad])
        with pytest.raises(ForgetfulError, match=message):
            parse_options("forget-experiment", forget_experiment.ARGUMENTS, ["--model", "m", "--zero-shot", bad])
