"""Each command's options are the library's config dataclasses: the flags, their short aliases, YAML
configs (aliases included) and the defaults a command gives the library's training options."""

from __future__ import annotations

import importlib

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
    with pytest.raises(ForgetfulError, match="recipe must be one of auto, open_unlearning, smollm2, got 'fast'"):
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
