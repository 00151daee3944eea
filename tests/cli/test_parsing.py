"""Each command's options are the library's config dataclasses: the flags, their short aliases, YAML
configs (aliases included) and the defaults a command gives the library's training options."""

from __future__ import annotations

import importlib

import pytest

from forgetful.cli import COMMANDS
from forgetful.cli.parsing import parse_options
from forgetful.errors import ForgetfulError
from forgetful.input.reinforce import ForgetTrainingConfig
from forgetful.loss.pretrain import PretrainTrainingArguments
from forgetful.tofu.experiment import TofuTrainingArguments


def _parse(command: str, argv: list[str]):
    module = importlib.import_module(f"forgetful.cli.{COMMANDS[command][0]}")
    return parse_options(command, module.ARGUMENTS, argv)


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
    assert (config.output_dir, config.per_device_batch_size, config.mode, config.num_samples) == (
        "o",
        3,
        "bernoulli",
        5,
    )
    assert args.keep == 0.75 and args.forget_p == 0.25 and args.model == "m"
    # the long names work too
    _, config = _parse("train-forget", ["--model", "m", "--output_dir", "o2", "--per_device_batch_size", "7"])
    assert (config.output_dir, config.per_device_batch_size) == ("o2", 7)


def test_choices_are_checked_on_the_command_line_and_in_the_library():
    with pytest.raises(ForgetfulError, match="invalid choice"):
        _parse("train-forget", ["--model", "m", "--out", "o", "--mode", "topk"])
    with pytest.raises(ForgetfulError, match="mode must be one of exact, bernoulli, got 'topk'"):
        ForgetTrainingConfig(mode="topk")
    with pytest.raises(ForgetfulError, match="mixed_precision must be one of no, bf16, fp16"):
        ForgetTrainingConfig(mixed_precision="fp8")
    assert ForgetTrainingConfig(mixed_precision=None).mixed_precision is None


def test_yaml_config_takes_field_names_and_flag_aliases(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\nout: from-yaml\nbatch-size: 4\nentropy_coef: 0.5\n")
    args, config = _parse("train-forget", ["--config", str(cfg)])
    assert (args.model, config.output_dir, config.per_device_batch_size, config.entropy_coef) == (
        "m",
        "from-yaml",
        4,
        0.5,
    )
    _, config = _parse("train-forget", ["--config", str(cfg), "--batch-size", "9"])  # flags override the file
    assert config.per_device_batch_size == 9


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


def test_every_command_parses_its_help(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as info:
            _parse(command, ["--help"])
        assert info.value.code == 0
        assert "--config" in capsys.readouterr().out


def test_every_option_of_every_command_has_help():
    import importlib

    from forgetful.cli import COMMANDS
    from forgetful.cli.parsing import _hf_parser

    missing = []
    for command, (module, _) in COMMANDS.items():
        classes = importlib.import_module(f"forgetful.cli.{module}").ARGUMENTS
        parser = _hf_parser(classes if len(classes) > 1 else classes[0], command, "")
        missing += [f"{command} {a.option_strings[0]}" for a in parser._actions if a.dest != "help" and not a.help]
    assert not missing


def test_the_command_list_loads_no_torch():
    """`forgetful --help` answers at once: listing the commands imports neither torch nor transformers."""
    import subprocess
    import sys

    code = "import sys, forgetful.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
