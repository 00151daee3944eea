"""Atomic writes: whole files or nothing, with the usual modes."""

from __future__ import annotations

import json
import os

import pytest

from forgetful.atomic import atomic_file, atomic_folder
from forgetful.reporting import write_json, write_text


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_written_files_get_the_usual_mode_not_mkstemps_private_one(tmp_path):
    umask = os.umask(0o022)
    try:
        write_json({"a": 1}, tmp_path / "r.json")
        write_text("hello", tmp_path / "r.md")
        assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
        assert _mode(tmp_path / "r.json") == 0o644 and _mode(tmp_path / "r.md") == 0o644
    finally:
        os.umask(umask)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    write_json({"old": True}, target)
    with pytest.raises(TypeError):
        write_json({"bad": object()}, target)
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"old": True}


def test_an_atomic_folder_replaces_the_old_one_whole_with_its_marker(tmp_path):
    final = tmp_path / "copy"
    final.mkdir()
    (final / "stale").write_text("x")
    umask = os.umask(0o022)
    try:
        with atomic_folder(final, marker="COMPLETE") as tmp:
            (tmp / "weights").write_text("w")
    finally:
        os.umask(umask)
    assert sorted(p.name for p in final.iterdir()) == ["COMPLETE", "weights"]
    assert _mode(final) == 0o755 and _mode(final / "weights") == 0o644
    with pytest.raises(ValueError), atomic_folder(final) as tmp:
        (tmp / "weights").write_text("new")
        raise ValueError
    assert (final / "weights").read_text() == "w" and len(list(tmp_path.iterdir())) == 1
