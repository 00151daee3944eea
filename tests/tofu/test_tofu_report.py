"""The TOFU experiment's report and plot (forgetful.tofu.report) from a set of results: forget
quality on a log axis (an exact 0 drawn at a floor the label names), model utility zoomed to the
runs, the retain run as reference lines, every run a point and a row of report.md."""

from __future__ import annotations

import numpy as np

from forgetful.tofu.experiment import TofuExperimentConfig
from forgetful.tofu.report import PLOT_FILE, plot_utility_vs_forget_quality, write_report

ENV = {
    "date": "2026-12-04 12:00 UTC",
    "torch": "2.9.0",
    "transformers": "4.57.0",
    "accelerate": "1.10.0",
    "git_commit": "abc1234",
    "device": "cuda",
    "gpu": "NVIDIA H200",
}


def _row(run, kind, strategy, fq, mu, **kw) -> dict:
    base = dict(run=run, kind=kind, strategy=strategy, forget_quality=fq, model_utility=mu, forget_truth_ratio=0.6)
    base.update(forget_prob=0.2, privleak=-10.0, epochs=5.0, steps=565, lr=1e-4, train_seconds=90.2, eval_seconds=45.1)
    base.update(kw)
    return base


# model utility's nine parts (SmolLM2's full run, tofu_real/2026-12-05)
FULL_PARTS = dict(zip(
    [f"{s}_{m}" for s in ("retain", "real_authors", "world_facts") for m in ("prob", "rouge", "truth_ratio")],
    [0.5355, 0.4470, 0.4336, 0.3060, 0.2133, 0.3760, 0.3112, 0.4412, 0.3748],
))  # fmt: skip
ROWS = [
    _row("retain", "finetune", "answer_only", 1.0, 0.346, forget_prob=0.148, privleak=0.0, steps=510),
    _row("full", "finetune", "answer_only", 7.98e-17, 0.355, forget_prob=0.553, privleak=-95.2, **FULL_PARTS),
    _row("full_forget_answers", "finetune", "forget_answers", 0.42, 0.351),
    _row("full_goldfish", "finetune", "goldfish", 0.0, 0.354),
    _row("full_npo", "unlearn", "npo", 0.031, 0.301, lr=1e-5, epochs=10.0, steps=130),
]
RECIPES = {
    "finetune": {
        "name": "smollm2",
        "asked": "auto",
        "overridden": {},
        "learning_rate": 1e-4,
        "num_train_epochs": 5.0,
        "per_device_train_batch_size": 32,
        "gradient_accumulation_steps": 1,
        "weight_decay": 0.01,
        "warmup_epochs": 1.0,
        "lr_scheduler_type": "linear",
        "optim": "adamw_torch_fused",
        "loss_average": "micro_batch",
    }
}


def test_the_plot_puts_forget_quality_on_a_log_axis_with_zero_at_a_floor(tmp_path):
    fig = plot_utility_vs_forget_quality(ROWS, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    # 0 is drawn a decade under the smallest positive forget quality, and the label says where
    floor = 7.98e-18
    assert "0 drawn at 8e-18" in ax.get_xlabel()
    points = np.array([c.get_offsets()[0] for c in ax.collections])
    expected = [(max(r["forget_quality"], floor), r["model_utility"]) for r in ROWS]
    np.testing.assert_allclose(points, expected, rtol=1e-9)
    # every run in the legend with its true values; the retain run as the target
    labels = ax.get_legend_handles_labels()[1]
    assert labels[:5] == [
        "retain (1.000, 0.346)",
        "full (7.98e-17, 0.355)",
        "full_forget_answers (0.420, 0.351)",
        "full_goldfish (0.000, 0.354)",
        "full_npo (0.031, 0.301)",
    ]
    assert labels[5] == "retain (target) (1.000, 0.346)"
    vertical = [line for line in ax.lines if list(line.get_xdata()) == [1.0, 1.0]]
    horizontal = [line for line in ax.lines if list(line.get_ydata()) == [0.346, 0.346]]
    assert len(vertical) == 1 and len(horizontal) == 1
    # model utility zoomed to the runs (0.301..0.355), with a margin
    lo, hi = ax.get_ylim()
    assert 0.28 < lo < 0.301 and 0.355 < hi < 0.38
    # every point inside the x range
    left, right = ax.get_xlim()
    assert left < floor and right > 1.0


def test_the_plot_without_zeros_or_a_retain_run(tmp_path):
    rows = [r for r in ROWS if r["run"] not in ("retain", "full_goldfish")]
    ax = plot_utility_vs_forget_quality(rows, tmp_path / "p.png", "t").axes[0]
    assert ax.get_xscale() == "log" and "drawn at" not in ax.get_xlabel() and not ax.lines
    np.testing.assert_allclose(
        np.array([c.get_offsets()[0] for c in ax.collections]),
        [(r["forget_quality"], r["model_utility"]) for r in rows],
        rtol=1e-9,
    )


def test_the_report_has_a_row_per_run_with_its_numbers(tmp_path):
    a = TofuExperimentConfig(model="smollm2-135m", out=str(tmp_path))
    write_report(tmp_path, a, RECIPES, ROWS, ["full_grad_diff"], ENV)
    assert (tmp_path / PLOT_FILE).stat().st_size > 1000
    text = (tmp_path / "report.md").read_text()
    header = "| run | kind | strategy | forget_quality | model_utility | model_utility_ci | utility_vs_full | "
    assert header + "utility_vs_full_ci | forget_truth_ratio | forget_prob | privleak |" in text
    assert "| epochs | steps | lr | train_seconds | eval_seconds |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    # a row per run in the main table, and again in the table of model utility's parts
    assert [line.split(" | ")[0][2:] for line in rows] == [r["run"] for r in ROWS] * 2
    assert "| run | retain prob | retain ROUGE | retain TR | real authors prob | real authors ROUGE |" in text
    assert "| retain | finetune | answer_only | 1.0000 | 0.3460 |  |  |  | 0.6000 | 0.1480 | 0.0000 |" in text
    assert "| full | finetune | answer_only | 7.98e-17 | 0.3550 |  |  |  | 0.6000 | 0.5530 | -95.2000 |" in text
    assert "| full_goldfish | finetune | goldfish | 0.0000 | 0.3540 |" in text
    assert "| 5 | 565 | 0.0001 | 90.2 | 45.1 |" in text  # epochs, steps, lr, seconds of a finetuning run
    assert "| 10 | 130 | 1e-05 | 90.2 | 45.1 |" in text  # and of the unlearning run
    assert "Finetuning recipe `smollm2` (picked by auto for this model). lr 0.0001, 5 epochs, 32 x 1 rows" in text
    assert "NVIDIA H200, torch 2.9.0, transformers 4.57.0, accelerate 1.10.0, commit abc1234" in text
    assert "Runs not done yet: full_grad_diff." in text and f"]({PLOT_FILE})" in text
    assert "| full | 0.5355 | 0.4470 | 0.4336 | 0.3060 | 0.2133 | 0.3760 | 0.3112 | 0.4412 | 0.3748 |" in text


def test_model_utility_intervals_as_whiskers_and_columns(tmp_path):
    """Rows with model utility's interval and ratio to the full run: a whisker per point (the y axis
    zoomed to hold them) and three columns of report.md."""
    intervals = {"retain": (0.33, 0.36), "full": (0.34, 0.37), "full_npo": (0.28, 0.32)}
    rows = [
        {**r, "model_utility_ci": list(intervals[r["run"]]), "utility_vs_full": r["model_utility"] / 0.355}
        | ({"utility_vs_full_ci": [0.93, 1.02]} if r["run"] == "retain" else {})
        for r in ROWS
        if r["run"] in intervals
    ]
    ax = plot_utility_vs_forget_quality(rows, tmp_path / "p.png", "t").axes[0]
    whiskers = [c for c in ax.collections if type(c).__name__ == "LineCollection"]
    segments = sorted(tuple(seg[:, 1]) for c in whiskers for seg in c.get_segments())
    assert segments == sorted(intervals.values())
    low, high = ax.get_ylim()
    assert low < 0.28 and high > 0.37
    a = TofuExperimentConfig(model="smollm2-135m", out=str(tmp_path))
    write_report(tmp_path, a, RECIPES, rows, [], ENV)
    text = (tmp_path / "report.md").read_text()
    assert (
        "| retain | finetune | answer_only | 1.0000 | 0.3460 | [0.3300, 0.3600] | 0.9746 | [0.9300, 1.0200] |" in text
    )
    assert "| full_npo | unlearn | npo | 0.0310 | 0.3010 | [0.2800, 0.3200] | 0.8479 |  |" in text
