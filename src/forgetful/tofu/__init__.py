"""The TOFU benchmark: the metrics as pure functions (:mod:`.metrics`), the evaluation suite that
scores and generates with a model (:mod:`.evaluation`), and the masked-training experiment
(:mod:`.experiment`). The data and its prompt/answer encoding are in :mod:`forgetful.data.tofu`."""
