"""Training infrastructure shared by both trainers: atomic, resumable checkpoints
(:mod:`~forgetful.training.checkpoints`), a clean stop on Ctrl-C or SIGTERM
(:mod:`~forgetful.training.interrupts`) and the process group's close at the end of a launched
run (:mod:`~forgetful.training.distributed`)."""
