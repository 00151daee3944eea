"""Killed and interrupted runs, through the CLI in a child process, for both trainers.

* SIGKILL mid-run, then ``--resume``: the final weights equal an uninterrupted run's, exactly.
* SIGKILL while a checkpoint is being written: that checkpoint is never chosen; resume as above.
* SIGINT (Ctrl-C): a checkpoint at the current step, exit status 130, one line saying where the
  checkpoint is; resuming from it gives the same final weights again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgetful.cli import main
from forgetful.training.checkpoints import MARKER, latest_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fault_worker.py")


def _argv(trainer: str, model_dir: Path, out: Path) -> list[str]:
    if trainer == "selective":
        return [
            "train-selective",
            "--task",
            "tofu",
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--num-authors",
            "3",
            "--strategy",
            "forget_facts",
            "--forget-split",
            "forget10",
            "--max_steps",
            "8",
            "--per_device_train_batch_size",
            "4",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--save_total_limit",
            "2",
            "--logging_steps",
            "1",
            "--seed",
            "0",
        ]
    return [
        "train-forget",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--mask",
        "mlp",
        "--keep",
        "0.5",
        "--exploration",
        "0.5,0",
        "--embedded_examples",
        "48",
        "--eval_examples",
        "8",
        "--batch_size",
        "8",
        "--num_samples",
        "2",
        "--max_steps_per_epoch",
        "4",
        "--save_steps",
        "1",
    ]


def _checkpoint_root(trainer: str, out: Path) -> Path:
    return out / "checkpoints" if trainer == "selective" else out


def _weights(trainer: str, out: Path) -> dict[str, torch.Tensor]:
    if trainer == "selective":
        return load_file(out / "model.safetensors")
    found = {f"lm.{k}": v for k, v in load_file(out / "lm" / "model.safetensors").items()}
    for f in sorted((out / "policy").glob("*.safetensors")):
        found.update({f"policy.{k}": v for k, v in load_file(f).items()})
    return found


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


def _start(argv: list[str], **env) -> subprocess.Popen:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), **env}
    return subprocess.Popen(
        [sys.executable, str(WORKER), *argv], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before the fault: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run to reach the fault")
        time.sleep(0.05)


def _sigkill_when(condition, argv: list[str], **env) -> subprocess.Popen:
    """Start the run and SIGKILL it as soon as ``condition()`` holds."""
    proc = _start(argv, **env)
    _wait_for(condition, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return proc


def _resume_gives(expected: dict, trainer: str, model_dir: Path, out: Path) -> None:
    assert main(_argv(trainer, model_dir, out) + ["--resume"]) == 0
    _assert_same_weights(_weights(trainer, out), expected)


def _complete(root: Path, step: int) -> bool:
    return (root / f"checkpoint-{step}" / MARKER).is_file()


@pytest.fixture(scope="module", params=["selective", "reinforce"])
def reference(request, tiny_model_dir, tmp_path_factory):
    """The trainer, its uninterrupted run's final weights, and the model folder."""
    trainer = request.param
    out = tmp_path_factory.mktemp(f"ref_{trainer}")
    assert main(_argv(trainer, tiny_model_dir, out)) == 0
    return trainer, _weights(trainer, out), tiny_model_dir


def test_sigkill_mid_run_then_resume_equals_uninterrupted(reference, tmp_path):
    trainer, expected, model_dir = reference
    out = tmp_path / "run"
    root = _checkpoint_root(trainer, out)
    proc = _sigkill_when(lambda: _complete(root, 4), _argv(trainer, model_dir, out), FAULT_STEP_DELAY="0.3")
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    _resume_gives(expected, trainer, model_dir, out)


def test_sigkill_while_writing_a_checkpoint_never_resumes_from_it(reference, tmp_path):
    trainer, expected, model_dir = reference
    out = tmp_path / "run"
    root = _checkpoint_root(trainer, out)
    sentinel = tmp_path / "saving"
    proc = _sigkill_when(
        sentinel.exists, _argv(trainer, model_dir, out), FAULT_SLOW_SAVE="4", FAULT_SENTINEL=str(sentinel)
    )
    assert proc.returncode == -signal.SIGKILL
    # the half-written checkpoint 4 is on disk (in place for the Trainer, under a temporary name
    # for REINFORCE) but not marked complete, so resume takes the one before it
    half = Path(sentinel.read_text())
    assert half.is_dir() and any(half.iterdir()) and not (half / MARKER).exists()
    assert latest_checkpoint(root).name == ("checkpoint-2" if trainer == "selective" else "checkpoint-3")
    _resume_gives(expected, trainer, model_dir, out)


def test_sigint_saves_a_checkpoint_and_exits_130(reference, tmp_path):
    trainer, expected, model_dir = reference
    out = tmp_path / "run"
    root = _checkpoint_root(trainer, out)
    proc = _start(_argv(trainer, model_dir, out), FAULT_STEP_DELAY="0.3")
    _wait_for(lambda: _complete(root, 2), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("forgetful: interrupted after step ") and "--resume" in last, last
    step = int(last.split("after step ")[1].split(";")[0])
    assert 2 <= step < 8
    assert _complete(root, step) and latest_checkpoint(root).name == f"checkpoint-{step}"
    assert not (out / "results.json").exists()
    _resume_gives(expected, trainer, model_dir, out)
