"""Loss forgetting: a per-token ``loss_mask`` decides which tokens the model learns from.

The trainer (:mod:`.trainer`: :class:`SelectiveLossTrainer`, its config and collator), the mask
builders (:mod:`.masks`), the task registry that turns data into masked rows (:mod:`.tasks`),
training as one call (:mod:`.training`) and plain pretraining on the same stack
(:mod:`.pretrain`)."""
