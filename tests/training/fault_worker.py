"""Runs the ``forgetful`` CLI in a child process with hooks that make faults easy to time.

    python fault_worker.py CLI-ARGS...

Environment:
  FAULT_STEP_DELAY   seconds to sleep in every optimizer step (gives a test time to signal us)
  FAULT_SLOW_SAVE    step whose checkpoint hangs just before it is marked complete; the worker
                     writes FAULT_SENTINEL first, so the test knows the files are half-written
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import forgetful.input.trainer as reinforce
import forgetful.input.trainer_io as reinforce_io
import forgetful.loss.trainer as selective
from forgetful.cli import main

delay = float(os.environ.get("FAULT_STEP_DELAY", "0"))
slow_save = os.environ.get("FAULT_SLOW_SAVE")


def _slow(method):
    def wrapped(*args, **kwargs):
        time.sleep(delay)
        return method(*args, **kwargs)

    return wrapped


def _hanging_mark_complete(original):
    def wrapped(folder):
        if slow_save is not None and Path(folder).name.endswith(f"checkpoint-{slow_save}"):
            Path(os.environ["FAULT_SENTINEL"]).write_text(str(folder))
            time.sleep(600)  # killed here
        return original(folder)

    return wrapped


if delay:
    selective.SelectiveLossTrainer.training_step = _slow(selective.SelectiveLossTrainer.training_step)
    reinforce.ForgetMaskTrainer._step = _slow(reinforce.ForgetMaskTrainer._step)
selective.mark_complete = _hanging_mark_complete(selective.mark_complete)
reinforce_io.mark_complete = _hanging_mark_complete(reinforce_io.mark_complete)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
