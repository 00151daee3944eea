"""``forgetful tofu-experiment``: full / retain / masked runs from one initialisation, evaluated
with the TOFU suite and plotted."""

from __future__ import annotations

from ..tofu.experiment import TofuExperimentConfig, TofuTrainingArguments, run_tofu_experiment

ARGUMENTS = (TofuExperimentConfig, TofuTrainingArguments)


def run(config: TofuExperimentConfig, training: TofuTrainingArguments, given: frozenset[str] = frozenset()) -> dict:
    """``given``: the options set on the command line or in the config file, which the recipe leaves alone."""
    return run_tofu_experiment(config, training, given)
