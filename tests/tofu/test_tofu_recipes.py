"""The TOFU experiment's finetuning recipes (forgetful.tofu.recipes) for library callers: the values
of each, auto's choice by model name, and the options a caller set left alone."""

from __future__ import annotations

import pytest

from forgetful.errors import ForgetfulError
from forgetful.tofu.experiment import TofuTrainingArguments
from forgetful.tofu.recipes import TOFU_RECIPES, apply_recipe, resolve_recipe


def test_the_recipes_values():
    keys = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps")
    keys += ("weight_decay", "warmup_epochs")
    # open-unlearning's configs/experiment/finetune/tofu/default.yaml; smollm2 differs in lr and batch only
    assert [TOFU_RECIPES["open_unlearning"][k] for k in keys] == [1e-5, 5.0, 8, 4, 0.01, 1.0]
    assert [TOFU_RECIPES["smollm2"][k] for k in keys] == [1e-4, 5.0, 32, 1, 0.01, 1.0]


def test_auto_goes_by_the_built_in_name():
    assert resolve_recipe("auto", "smollm2-135m") == "smollm2"
    assert resolve_recipe("auto", "runs/smollm2-135m") == "open_unlearning"  # a folder may hold anything
    assert resolve_recipe("smollm2", "gpt2") == "smollm2"
    with pytest.raises(
        ForgetfulError, match="recipe must be one of auto, open_unlearning, smollm2, demo, got 'Smollm2'"
    ):
        resolve_recipe("Smollm2", "gpt2")


def test_a_library_caller_keeps_the_options_it_set():
    training = TofuTrainingArguments(learning_rate=3e-4, max_steps=2)
    record = apply_recipe(training, "auto", "smollm2-135m")
    assert (training.learning_rate, training.per_device_train_batch_size, training.gradient_accumulation_steps) == (
        3e-4,
        32,
        1,
    )
    assert (record["name"], record["overridden"]) == ("smollm2", {"learning_rate": 3e-4})
    # an option set to its default value is named in `given`
    training = TofuTrainingArguments(learning_rate=1e-5)
    apply_recipe(training, "smollm2", "gpt2", given={"learning_rate"})
    assert (training.learning_rate, training.per_device_train_batch_size) == (1e-5, 32)


def test_a_warm_up_in_steps_is_not_overridden_by_the_recipes_epochs():
    training = TofuTrainingArguments(warmup_steps=7)
    record = apply_recipe(training, "smollm2", "gpt2")
    assert (training.warmup_steps, training.warmup_epochs) == (7, None)
    assert record["overridden"]["warmup_epochs"] is None
    # a flag given at its default value (no warm-up at all) counts too
    training = TofuTrainingArguments(warmup_steps=0)
    apply_recipe(training, "open_unlearning", "gpt2", given={"warmup_steps"})
    assert (training.warmup_steps, training.warmup_epochs) == (0, None)
    # without a warm-up of their own, the recipe's epoch of warm-up holds
    training = TofuTrainingArguments()
    apply_recipe(training, "smollm2", "gpt2", given=set())
    assert training.warmup_epochs == 1.0


def test_one_registry_sets_the_unlearning_runs_too():
    """A recipe names the finetuning and the unlearning options; an unlearning option the user set wins."""
    from forgetful.tofu.experiment import TofuExperimentConfig
    from forgetful.tofu.grid import plan_runs
    from forgetful.tofu.recipes import UNLEARN_RECIPES, apply_unlearn_recipe

    config = TofuExperimentConfig(model="gpt2", out="o", unlearn_learning_rate=3e-5)
    assert config.unlearn_epochs is None  # unset: the recipe's
    values = apply_unlearn_recipe(config, "open_unlearning", "gpt2")
    assert values == {
        "unlearn_learning_rate": 3e-5,
        "unlearn_epochs": 10.0,
        "unlearn_weight_decay": 0.01,
        "unlearn_warmup_epochs": 1.0,
    }
    assert UNLEARN_RECIPES["demo"]["unlearn_learning_rate"] == 1e-4 and TOFU_RECIPES["demo"]["num_train_epochs"] == 20.0
    # the plan reads the recipe's unlearning epochs when none is given (checkpoints at 2 and 5 of 10)
    unset = TofuExperimentConfig(model="gpt2", out="o", eval_epochs="2,5", unlearning="npo", strategies="")
    (npo,) = [r for r in plan_runs(unset) if r.kind == "unlearn"]
    assert npo.eval_epochs == (2, 5)
