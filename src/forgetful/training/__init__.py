"""Training infrastructure shared by both trainers: atomic, resumable checkpoints
(:mod:`~forgetful.training.checkpoints`) and a clean stop on Ctrl-C or SIGTERM
(:mod:`~forgetful.training.interrupts`)."""
