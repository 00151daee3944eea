"""Both trainers under torchrun with 2 CPU processes (gloo) compute what 1 process computes at the
same global batch: per-step losses equal within 1e-5 (DDP for both, FSDP2 for the Trainer path; the
Trainer with the chunked loss backend, which ``auto`` is on the CPU, and with the dense one), and
the train_loss logged at the end is the global figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_ddp.py"


def _launch(args: list[str], processes: int) -> subprocess.CompletedProcess:
    """``python ARGS`` in one process, or under torchrun with ``processes`` CPU processes; it must succeed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    launcher = (
        [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    )
    proc = subprocess.run([sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _run(trainer: str, processes: int, out: Path, extra: tuple[str, ...] = ()) -> dict:
    args = [
        str(SCRIPT),
        "--trainer",
        trainer,
        "--global-batch",
        "8",
        "--steps",
        "4",
        "--out",
        str(out),
        "--workdir",
        str(out.parent / f"work_{trainer}_{processes}"),
        *extra,
    ]
    _launch(args, processes)
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "trainer,extra,both",
    [
        ("selective", (), ()),
        ("selective", ("--fsdp",), ()),
        ("selective", (), ("--loss-backend", "dense")),
        ("reinforce", (), ()),
    ],
    ids=["selective-ddp-chunked", "selective-fsdp-chunked", "selective-ddp-dense", "reinforce-ddp"],
)
def test_two_processes_match_one_at_the_same_global_batch(trainer, extra, both, tmp_path):
    one = _run(trainer, 1, tmp_path / "one.json", both)
    two = _run(trainer, 2, tmp_path / "two.json", (*extra, *both))
    if trainer == "selective":
        assert one["loss_backend"] == two["loss_backend"] == (both[1] if both else "auto")
    assert one["processes"] == 1 and two["processes"] == 2
    assert two["per_device_batch"] * 2 == one["per_device_batch"] == 8
    assert len(one["losses"]) == len(two["losses"]) == 4
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) < 1e-5, (one["losses"], two["losses"])
    # training moved the weights, by the same amount in both runs (up to float summation order)
    assert one["losses"][0] != one["losses"][-1]
    assert abs(one["checksum"][0] - two["checksum"][0]) < 1e-4 * max(1.0, abs(one["checksum"][0]))


def test_logged_train_loss_is_the_global_mean(tmp_path):
    """Trainer logs the loss of the steps after the last logging step from each process's own
    share; with 4 steps logged every 3, the train_loss that the log history and the trackers get
    must still be the global figure: the one process's value, and the value train() returns."""
    logging = ("--logging-steps", "3")
    one = _run("selective", 1, tmp_path / "one.json", logging)
    two = _run("selective", 2, tmp_path / "two.json", logging)
    assert len(one["losses"]) == len(two["losses"]) == 1  # step 3 (Trainer gathers this one)
    assert abs(one["losses"][0] - two["losses"][0]) < 1e-5
    (logged_one,), (logged_two,) = one["logged_train_loss"], two["logged_train_loss"]
    assert abs(logged_one - logged_two) < 1e-5, (logged_one, logged_two)
    assert abs(two["train_loss"] - logged_two) < 1e-6 and abs(one["train_loss"] - two["train_loss"]) < 1e-5


def test_cli_under_torchrun_writes_once(tiny_model_dir, tmp_path):
    """The train-forget command under a launcher: one process evaluates, prints and writes."""
    out = tmp_path / "rl"
    cmd = [
        "-m",
        "forgetful",
        "train-forget",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--mask",
        "mlp",
        "--keep",
        "0.5",
        "--exploration",
        "0.5",
        "--embedded_examples",
        "48",
        "--eval_examples",
        "8",
        "--batch_size",
        "4",
        "--num_samples",
        "2",
        "--max_steps_per_epoch",
        "3",
    ]
    proc = _launch(cmd, 2)
    assert proc.stdout.count("held-out target NLL") == 1, proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["train_examples"] == 48 and results["mlp_nll"] > 0
    assert (out / "checkpoint-3" / "COMPLETE").is_file() and (out / "policy" / "policy.safetensors").is_file()


@pytest.mark.parametrize("sharding", [(), ("--fsdp", "full_shard auto_wrap")], ids=["ddp", "fsdp"])
def test_train_selective_command_under_torchrun_matches_one_process(sharding, tiny_model_dir, tmp_path):
    """The train-selective command on 2 CPU processes (gloo picked for CPU) trains what 1 process
    trains at the same global batch, and one process writes the outputs."""
    common = [
        "train-selective",
        "--task",
        "tofu",
        "--model",
        str(tiny_model_dir),
        "--num-authors",
        "3",
        "--strategy",
        "forget_facts",
        "--forget-split",
        "forget10",
        "--max_steps",
        "3",
        "--seed",
        "0",
    ]
    extra = list(sharding)
    if sharding:
        config = tmp_path / "fsdp.json"
        config.write_text(json.dumps({"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}))
        extra += ["--fsdp_config", str(config)]
    command = ["-m", "forgetful", *common]
    _launch([*command, "--out", str(tmp_path / "one"), "--per_device_train_batch_size", "4"], 1)
    proc = _launch([*command, "--out", str(tmp_path / "two"), "--per_device_train_batch_size", "2", *extra], 2)
    assert proc.stdout.count("trained 3 steps") == 1, proc.stdout
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert abs(one["train_loss"] - two["train_loss"]) < 1e-5
