"""close_process_group: a no-op without a group; with one, the group is gone afterwards and the
process exits cleanly after a collective (run in a child, so this process never holds a group).
The exit race it narrows (a gloo thread releasing tensors during finalisation) cannot be provoked
on demand; the two-process runs of test_distributed.py are where it showed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch.distributed as dist

from forgetful.training.distributed import close_process_group

ROOT = Path(__file__).resolve().parents[2]


def test_without_a_group_it_does_nothing():
    assert not dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()


def test_it_destroys_the_group_and_the_process_exits_cleanly(tmp_path):
    child = textwrap.dedent(
        f"""
        import torch, torch.distributed as dist
        from forgetful.training.distributed import close_process_group
        dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        model(torch.ones(1, 2)).sum().backward()
        out = [torch.zeros(2)]
        dist.all_gather(out, torch.arange(2.0))
        assert out[0].tolist() == [0.0, 1.0]
        close_process_group()
        print("initialized after close:", dist.is_initialized())
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "initialized after close: False"
