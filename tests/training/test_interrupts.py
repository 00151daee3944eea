"""StopOnSignal (forgetful.training.interrupts) in this process: the first SIGTERM or SIGINT asks
to stop and says whether a checkpoint follows, the second stops at once, the old handlers return."""

from __future__ import annotations

import os
import signal

import pytest

from forgetful.training.interrupts import StopOnSignal


@pytest.mark.parametrize(
    ("checkpoint", "said"), [(True, "saving a checkpoint"), (False, "no checkpoint: the run has no output folder")]
)
def test_first_signal_asks_to_stop_and_says_what_follows(checkpoint, said, capsys):
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal(checkpoint=checkpoint) as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.should_stop()
        with pytest.raises(KeyboardInterrupt):  # asked twice: at once
            os.kill(os.getpid(), signal.SIGINT)
    err = capsys.readouterr().err
    assert f"SIGTERM: stopping after this step, {said} (send it again to stop at once)" in err
    assert ("saving a checkpoint" in err) == checkpoint
    assert signal.getsignal(signal.SIGTERM) is before
