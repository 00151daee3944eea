"""Atomic, resumable checkpoints.

A checkpoint is a folder ``checkpoint-<step>``. It is written under a temporary name and renamed
into place only when complete (and carries a ``COMPLETE`` marker), so a run killed while writing
never leaves a folder that a resume would pick. Resume always takes the newest complete one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..atomic import fsync_dir
from ..errors import ForgetfulError

MARKER = "COMPLETE"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(folder: str | os.PathLike) -> None:
    """Write the completion marker (durably) into ``folder``."""
    folder = Path(folder)
    with open(folder / MARKER, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file()


def checkpoints(root: str | os.PathLike, complete_only: bool = True) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and (is_complete(p) or not complete_only):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none)."""
    found = checkpoints(root)
    return found[-1][1] if found else None


def latest_trainer_checkpoint(root: str | os.PathLike) -> str | None:
    """For ``Trainer.train(resume_from_checkpoint=...)``: the newest complete checkpoint."""
    path = latest_checkpoint(root)
    return str(path) if path is not None else None


def rotate(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and any stale temporary folders."""
    root = Path(root)
    if keep < 1:
        raise ForgetfulError(f"must keep at least one checkpoint, got {keep}")
    for _, p in checkpoints(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
