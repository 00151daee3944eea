"""Stopping training cleanly on Ctrl-C (SIGINT) or a scheduler's preemption notice (SIGTERM).

The first signal asks the trainer to stop *after the current optimizer step*, so the checkpoint it
then writes is a state that an uninterrupted run also passes through, and resuming from it gives
the same final weights. A second signal stops at once (no checkpoint). Under a multi-process
launcher the request is shared (one small all-reduce per step) so every process stops at the same
step: a process that stopped alone would leave its peers waiting in a collective forever.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

from ..errors import TrainingInterrupted  # noqa: F401  (raised by the trainers, caught by the CLI)


class StopOnSignal:
    """Context manager: while active, SIGINT and SIGTERM set :attr:`requested` instead of raising.
    ``checkpoint``: whether the trainer writes a checkpoint when it stops (not without an output
    folder), so the message printed on the signal tells the truth."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoint: bool = True) -> None:
        self.requested = False
        self.checkpoint = checkpoint
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # asked twice: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        then = "saving a checkpoint" if self.checkpoint else "no checkpoint: the run has no output folder"
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step, {then} (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def should_stop(self, accelerator=None) -> bool:
        """True on every process once any process was signalled (call it once per step on all)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
