"""``forgetful forget-experiment``: input forgetting under the fair protocol (every strategy scored
zero-shot and on an LM finetuned to read its own compressions; learned policies fitted by
REINFORCE, the relaxed learner or the supervised one, over seeds; the oracle's headroom), with a
report and plots."""

from __future__ import annotations

from ..input.experiment import ForgetExperimentConfig, run_forget_experiment
from ..input.learners import RelaxedConfig, SupervisedConfig
from ..input.reinforce import ForgetTrainingConfig

ARGUMENTS = (ForgetExperimentConfig, ForgetTrainingConfig, RelaxedConfig, SupervisedConfig)


def run(
    config: ForgetExperimentConfig, training: ForgetTrainingConfig, relaxed: RelaxedConfig, supervised: SupervisedConfig
) -> list[dict]:
    rows = run_forget_experiment(config, training, relaxed, supervised)
    print(f"{len(rows)} rows in {training.output_dir}/results.json; report: {training.output_dir}/report.md")
    return rows
