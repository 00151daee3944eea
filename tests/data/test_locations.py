"""Known datasets by name: $FORGETFUL_DATA when it is set, the Hub otherwise, one line offline."""

from __future__ import annotations

import pytest

from forgetful.data.locations import DATA_ENV, resolve
from forgetful.data.sources import load_rows
from forgetful.data.tofu import load_tofu_split
from forgetful.errors import ForgetfulError


def test_names_resolve_to_the_data_folder_when_it_is_set(shared_data, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(shared_data))
    assert resolve("tofu").source == str(shared_data / "tofu")
    assert resolve("wikitext2:test").source == str(shared_data / "wikitext2" / "test.txt")
    assert resolve("some/folder").source == "some/folder" and resolve("some/folder").named is None
    rows = load_tofu_split("tofu", "forget01")
    assert len(rows) == 40 and {"question", "answer"} <= set(rows[0])
    lines = load_rows("wikitext2:valid")
    assert len(lines) > 1000 and "text" in lines.column_names


def test_names_resolve_to_the_hub_without_a_data_folder(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    found = resolve("wikitext2:test")
    assert (found.source, found.config, found.split, found.on_hub) == ("wikitext", "wikitext-2-v1", "test", True)
    assert resolve("tofu").source == "locuslab/TOFU"


def test_offline_without_either_is_one_line_naming_both(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (lambda: load_tofu_split("tofu", "forget01"), lambda: load_rows("wikitext2:test")):
        with pytest.raises(ForgetfulError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and DATA_ENV in message and ("locuslab/TOFU" in message or "wikitext" in message)


def test_a_bad_data_folder_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(ForgetfulError, match="is not a folder"):
        resolve("tofu")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(ForgetfulError, match="does not exist .*unset FORGETFUL_DATA"):
        resolve("tofu")
    with pytest.raises(ForgetfulError, match="wikitext2:test is not TOFU"):
        load_tofu_split("wikitext2:test", "forget01")
