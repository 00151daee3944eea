"""The demo report explains a column of zero model utilities, and only that."""

from __future__ import annotations

from forgetful.demo import _zero_utility_note


def _row(mu, real=0.0, world=0.05, retain=0.01):
    return {"model_utility": mu, "real_authors_rouge": real, "world_facts_rouge": world, "retain_rouge": retain}


def test_all_zero_utilities_name_the_parts_that_are_zero():
    note = _zero_utility_note([_row(0.0), _row(0.0, world=0.0)])
    assert len(note) == 2 and "the real-authors ROUGE is 0 for every run" in note[0]
    assert "world-facts" not in note[0]  # it is not 0 in every run


def test_no_part_zero_everywhere_still_explains():
    note = _zero_utility_note([_row(0.0, real=0.1), _row(0.0, real=0.0, world=0.1)])
    assert "in every run some part of it is 0" in note[0] and "share no word" not in note[0]


def test_nothing_to_explain():
    assert _zero_utility_note([_row(0.0), _row(0.3)]) == []
    assert _zero_utility_note([]) == []


def test_the_real_model_part_reads_the_data_folder_when_there_is_one(monkeypatch, tmp_path):
    from forgetful.data.locations import DATA_ENV
    from forgetful.demo import DemoConfig, _real_text

    monkeypatch.delenv(DATA_ENV, raising=False)
    source, name = _real_text(DemoConfig())
    assert source is None and "embedded corpus" in name  # offline and no data folder: the embedded corpus
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert _real_text(DemoConfig())[0] == "wikitext2:test"
    assert _real_text(DemoConfig(wikitext="my.txt")) == ("my.txt", "my.txt")
