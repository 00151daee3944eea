"""The end of a run under a launcher (torchrun, ``accelerate launch``): the process group's close."""

from __future__ import annotations

import time

import torch.distributed as dist

# How long the closing process leaves the GIL to the communication threads before it exits.
SETTLE_S = 0.1


def close_process_group() -> None:
    """Destroy the default process group, if one is open, and let its threads settle before exit.

    Why the pause: gloo's worker threads release a finished collective's tensors just after the
    caller was told it finished, and releasing a tensor that Python has seen takes the GIL. If that
    happens after the interpreter began finalising, the thread is ended mid-destructor and the
    process aborts with "terminate called without an active exception" (pytorch/pytorch#190489),
    after the run's work was written, so the launcher reports a failure. ``destroy_process_group``
    does not join those threads while a DDP reducer still holds the group, so the closing process
    sleeps briefly, outside the GIL, while the interpreter is still fully alive. This narrows the
    race to a thread that stays descheduled for longer than the pause; it cannot close it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    time.sleep(SETTLE_S)
