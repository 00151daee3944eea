"""The demo report explains a column of zero model utilities, and only that."""

from __future__ import annotations

import pytest

from forgetful.demo import zero_utility_note


def _row(mu, real=0.0, world=0.05, retain=0.01):
    return {"model_utility": mu, "real_authors_rouge": real, "world_facts_rouge": world, "retain_rouge": retain}


def test_all_zero_utilities_name_the_parts_that_are_zero():
    note = zero_utility_note([_row(0.0), _row(0.0, world=0.0)])
    assert len(note) == 2 and "the real-authors ROUGE is 0 for every run" in note[0]
    assert "world-facts" not in note[0]  # it is not 0 in every run


def test_no_part_zero_everywhere_still_explains():
    note = zero_utility_note([_row(0.0, real=0.1), _row(0.0, real=0.0, world=0.1)])
    assert "in every run some part of it is 0" in note[0] and "share no word" not in note[0]


def test_nothing_to_explain():
    assert zero_utility_note([_row(0.0), _row(0.3)]) == []
    assert zero_utility_note([]) == []


def test_the_real_model_part_reads_the_data_folder_when_there_is_one(monkeypatch, tmp_path):
    from forgetful.data.locations import DATA_ENV
    from forgetful.demo import DemoConfig, real_text_source

    monkeypatch.delenv(DATA_ENV, raising=False)
    source, name = real_text_source(DemoConfig())
    assert source is None and "embedded corpus" in name  # offline and no data folder: the embedded corpus
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert real_text_source(DemoConfig())[0] == "wikitext2:test"
    assert real_text_source(DemoConfig(wikitext="my.txt")) == ("my.txt", "my.txt")


def test_the_demo_plane_plots_a_utility_the_tiny_model_earns(tmp_path):
    """Model utility is 0 at this scale (no real authors, no world facts); the demo's plane plots the
    retain set's probability and truth ratio instead, so both axes move, and says so."""
    from forgetful.demo import DEMO_UTILITY, demo_utility, plot_demo_plane

    rows = [
        {"run": "retain", "forget_quality": 1.0, "retain_prob": 0.2, "retain_truth_ratio": 0.6, "model_utility": 0.0},
        {"run": "full", "forget_quality": 1e-6, "retain_prob": 0.3, "retain_truth_ratio": 0.5, "model_utility": 0.0},
        {
            "run": "full_npo",
            "forget_quality": 1e-3,
            "retain_prob": 0.1,
            "retain_truth_ratio": 0.0,
            "model_utility": 0.0,
        },
    ]
    assert demo_utility(rows[0]) == pytest.approx(2 * 0.2 * 0.6 / 0.8)
    assert demo_utility(rows[2]) == 0.0
    fig = plot_demo_plane(rows, tmp_path / "plane.png")
    ys = [coll.get_offsets()[0][1] for coll in fig.axes[0].collections]
    assert len(set(ys)) == 3 and (tmp_path / "plane.png").is_file()  # the y axis moves
    assert "retain utility" in fig.axes[0].get_ylabel() and "real-authors" in DEMO_UTILITY
