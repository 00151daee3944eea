"""The TOFU experiment's report and plot (forgetful.tofu.report, forgetful.tofu.plane) from a set of
results: forget quality on a log axis (an exact 0 drawn at a floor the label names), the retain run
as reference lines, every run a point and a row of report.md, seeds as whiskers, the noise floor
and the best points in the report."""

from __future__ import annotations

import numpy as np

from forgetful.tofu.experiment import TofuExperimentConfig
from forgetful.tofu.plane import experiment_summary, plot_plane
from forgetful.tofu.report import PLOT_FILE, write_report

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
    base = dict(
        run=run, kind=kind, strategy=strategy, seed=0, forget_quality=fq, model_utility=mu, forget_truth_ratio=0.6
    )
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


def _offsets(ax) -> list[tuple[float, float]]:
    return sorted(tuple(map(float, xy)) for c in ax.collections for xy in c.get_offsets())


def test_the_plot_puts_forget_quality_on_a_log_axis_with_zero_at_a_floor(tmp_path):
    fig = plot_plane(ROWS, experiment_summary(ROWS), tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    # 0 is drawn a decade under the smallest positive forget quality, and the label says where
    floor = 7.98e-18
    assert "0 drawn at 8e-18" in ax.get_xlabel()
    # every run but retain (the reference lines) a point where its values are
    expected = [(max(r["forget_quality"], floor), r["model_utility"]) for r in ROWS if r["run"] != "retain"]
    np.testing.assert_allclose(_offsets(ax), sorted(expected), rtol=1e-9)
    labels = ax.get_legend_handles_labels()[1]
    assert {"npo: 1 points, line: its frontier", "full", "retain (seed 0)"} <= set(labels)
    assert "full_forget_answers" in labels and "full_goldfish" in labels
    # npo keeps 0.301 < 0.95 x 0.355: no best point, no star
    assert not [label for label in labels if "best" in label]
    vertical = [line for line in ax.lines if list(line.get_xdata()) == [1.0, 1.0]]
    horizontal = [line for line in ax.lines if list(line.get_ydata()) == [0.346, 0.346]]
    assert len(vertical) == 1 and len(horizontal) == 1
    left, right = ax.get_xlim()
    assert left < floor and right > 1.0


def test_the_plot_draws_seeds_as_whiskers_the_floor_and_the_best_point(tmp_path):
    rows = [
        *ROWS,
        _row("retain_s1", "finetune", "answer_only", 0.5, 0.34, seed=1),
        _row("full_goldfish_s1", "finetune", "goldfish", 1e-3, 0.35, seed=1),
        _row("full_goldfish_s2", "finetune", "goldfish", 1e-5, 0.36, seed=2),
        _row("full_npo_lr1", "unlearn", "npo", 0.2, 0.34),  # keeps >= 0.95 x full: the best point
        _row("full_npo_lr1_s1", "unlearn", "npo", 0.4, 0.33, seed=1),
    ]
    summary = experiment_summary(rows)
    assert summary["best_points"] == {"npo": "full_npo_lr1"}
    ax = plot_plane(rows, summary, tmp_path / "p.png", "t").axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "npo best: full_npo_lr1 (median of seeds 0, 1)" in labels and "noise floor: retain_s1" in labels
    assert "full_goldfish (median of seeds 0, 1, 2)" in labels
    # goldfish at its median over seeds (1e-5 at 0.354 is not: the median forget quality is 1e-5, utility 0.354)
    whiskers = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(whiskers) == 2
    goldfish = next(c for c in whiskers if c.get_label().startswith("full_goldfish"))
    x, y = goldfish.lines[0].get_data()
    assert (float(x[0]), float(y[0])) == (1e-5, 0.354)
    (xbar, ybar) = goldfish.lines[2]
    np.testing.assert_allclose(xbar.get_segments()[0][:, 0], [7.98e-18, 1e-3], rtol=1e-3)  # seed 0's 0 at the floor
    np.testing.assert_allclose(ybar.get_segments()[0][:, 1], [0.35, 0.36])


def test_the_report_has_a_row_per_run_with_its_numbers(tmp_path):
    a = TofuExperimentConfig(model="smollm2-135m", out=str(tmp_path))
    write_report(tmp_path, a, RECIPES, ROWS, ["full_grad_diff"], ENV, experiment_summary(ROWS))
    assert (tmp_path / PLOT_FILE).stat().st_size > 1000
    text = (tmp_path / "report.md").read_text()
    header = (
        "| run | kind | strategy | seed | epoch | masked_share | forget_quality | model_utility | model_utility_ci | "
    )
    header += "utility_vs_full | "
    assert header + "utility_vs_full_ci | forget_truth_ratio | forget_prob | privleak |" in text
    assert "| epochs | steps | lr | train_seconds | eval_seconds |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    # a row per run in the main table, and again in the table of model utility's parts
    assert [line.split(" | ")[0][2:] for line in rows] == [r["run"] for r in ROWS] * 2
    assert "| run | retain prob | retain ROUGE | retain TR | real authors prob | real authors ROUGE |" in text
    assert "| retain | finetune | answer_only | 0 |  |  | 1.0000 | 0.3460 |  |  |  | 0.6000 | 0.1480 | 0.0000 |" in text
    assert (
        "| full | finetune | answer_only | 0 |  |  | 7.98e-17 | 0.3550 |  |  |  | 0.6000 | 0.5530 | -95.2000 |" in text
    )
    assert "| full_goldfish | finetune | goldfish | 0 |  |  | 0.0000 | 0.3540 |" in text
    assert "Noise floor: no retain run at another seed yet" in text and "- npo: no point keeps the utility" in text
    assert "| 5 | 565 | 0.0001 | 90.2 | 45.1 |" in text  # epochs, steps, lr, seconds of a finetuning run
    assert "| 10 | 130 | 1e-05 | 90.2 | 45.1 |" in text  # and of the unlearning run
    assert "Finetuning recipe `smollm2` (picked by auto for this model). lr 0.0001, 5 epochs, 32 x 1 rows" in text
    assert "NVIDIA H200, torch 2.9.0, transformers 4.57.0, accelerate 1.10.0, commit abc1234" in text
    assert "Runs not done yet: full_grad_diff." in text and f"]({PLOT_FILE})" in text
    assert "| full | 0.5355 | 0.4470 | 0.4336 | 0.3060 | 0.2133 | 0.3760 | 0.3112 | 0.4412 | 0.3748 |" in text


def test_model_utility_intervals_as_whiskers_and_columns(tmp_path):
    """Rows with model utility's interval and ratio to the full run: three columns of report.md (the
    plot's whiskers are the seeds')."""
    intervals = {"retain": (0.33, 0.36), "full": (0.34, 0.37), "full_npo": (0.28, 0.32)}
    rows = [
        {**r, "model_utility_ci": list(intervals[r["run"]]), "utility_vs_full": r["model_utility"] / 0.355}
        | ({"utility_vs_full_ci": [0.93, 1.02]} if r["run"] == "retain" else {})
        for r in ROWS
        if r["run"] in intervals
    ]
    a = TofuExperimentConfig(model="smollm2-135m", out=str(tmp_path))
    write_report(tmp_path, a, RECIPES, rows, [], ENV, experiment_summary(rows))
    text = (tmp_path / "report.md").read_text()
    assert (
        "| retain | finetune | answer_only | 0 |  |  | 1.0000 | 0.3460 | [0.3300, 0.3600] | 0.9746 | [0.9300, 1.0200] |"
        in text
    )
    assert "| full_npo | unlearn | npo | 0 |  |  | 0.0310 | 0.3010 | [0.2800, 0.3200] | 0.8479 |  |" in text
