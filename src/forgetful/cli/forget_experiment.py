"""``forgetful forget-experiment``: input forgetting under the fair protocol (every strategy scored
zero-shot and on an LM finetuned to read its own compressions; learned policies on the LM trained
with them), with a report and plots."""

from __future__ import annotations

from ..input.experiment import ForgetExperimentConfig, run_forget_experiment
from ..input.reinforce import ForgetTrainingConfig

ARGUMENTS = (ForgetExperimentConfig, ForgetTrainingConfig)


def run(config: ForgetExperimentConfig, training: ForgetTrainingConfig) -> list[dict]:
    rows = run_forget_experiment(config, training)
    print(f"{len(rows)} rows in {training.output_dir}/results.json; report: {training.output_dir}/report.md")
    return rows
