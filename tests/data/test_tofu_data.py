"""TOFU data (forgetful.tofu, forgetful.data.embedded_tofu.tofu_splits): the embedded splits against the
schema and split relations of the real benchmark (../shared/data/tofu), loading the real folder,
and the errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from forgetful.data.embedded_tofu import tofu_splits
from forgetful.data.tofu import load_tofu_split, split_kind
from forgetful.errors import ForgetfulError

PERTURBED_FIELDS = {"question", "answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer"}
OPTION_FIELDS = {"question", "answer", "option1", "option2", "option3", "option4"}
FORGET_PCTS = (1, 5, 10)


def _first_row(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())


def _qa(rows):
    return [(r["question"], r["answer"]) for r in rows]


def _author_of(row: dict) -> str:
    """The author named by an embedded birthplace answer ("<name> was born in <city>.")."""
    return row["answer"].split(" was born in ")[0]


@pytest.fixture(scope="module")
def real_tofu(shared_data):
    folder = shared_data / "tofu"
    if not folder.is_dir():
        pytest.skip("../shared/data/tofu is not available")
    return folder


@pytest.fixture(scope="module")
def emb():
    return tofu_splits(20, seed=0)


# --------------------------------------------------------------------------------------------
# Embedded splits: schema of the real data
# --------------------------------------------------------------------------------------------


def test_embedded_has_the_real_splits_and_field_names(real_tofu, emb):
    real_splits = {p.stem for p in real_tofu.glob("*.json")}
    assert set(emb) == real_splits
    for split in sorted(real_splits):
        real_fields = set(_first_row(real_tofu / f"{split}.json"))
        assert set(emb[split][0]) == real_fields, split
        assert all(set(r) == real_fields for r in emb[split]), split


def test_embedded_field_names_per_kind(emb):
    for split, rows in emb.items():
        fields = set(rows[0])
        if split in ("real_authors", "world_facts"):
            assert fields == OPTION_FIELDS, split
        elif split in ("real_authors_perturbed", "world_facts_perturbed"):
            assert fields == {"question", "answer", "perturbed_answer"}, split
            assert split_kind(split) == "options"
        elif split.endswith("_perturbed"):
            assert fields == PERTURBED_FIELDS, split
            assert split_kind(split) == "perturbed"
        else:
            assert fields == {"question", "answer"}, split
            assert split_kind(split) == "plain"


def test_embedded_perturbed_answer_counts_match_real(real_tofu, emb):
    for split, n in (
        ("forget01_perturbed", 5),
        ("forget05_perturbed", 5),
        ("forget10_perturbed", 5),
        ("retain_perturbed", 5),
        ("real_authors_perturbed", 3),
        ("world_facts_perturbed", 3),
    ):
        assert len(_first_row(real_tofu / f"{split}.json")["perturbed_answer"]) == n, split
        assert all(len(r["perturbed_answer"]) == n for r in emb[split]), split
        # perturbed answers are wrong answers, all different from the true one
        for r in emb[split]:
            assert r["answer"] not in r["perturbed_answer"]
            assert len(set(r["perturbed_answer"])) == n
            if "paraphrased_answer" in r:
                assert r["paraphrased_answer"] not in r["perturbed_answer"]
            assert all(isinstance(a, str) and a for a in r["perturbed_answer"])


def test_embedded_options_hold_the_answer_and_the_perturbed_answers(emb):
    for name in ("real_authors", "world_facts"):
        plain, pert = emb[name], emb[f"{name}_perturbed"]
        assert _qa(plain) == _qa(pert)
        for p, q in zip(plain, pert):
            options = [p[f"option{i}"] for i in range(1, 5)]
            assert p["answer"] in options
            assert sorted(options) == sorted([q["answer"], *q["perturbed_answer"]])


# --------------------------------------------------------------------------------------------
# Embedded splits: the split relations of the real data
# --------------------------------------------------------------------------------------------


def test_embedded_full_is_authors_times_20_in_author_order(emb):
    full = emb["full"]
    assert len(full) == 20 * 20
    authors = [_author_of(full[i]) for i in range(0, len(full), 20)]
    assert len(set(authors)) == 20
    for i, r in enumerate(full):  # every block of 20 rows is about one author
        assert authors[i // 20] in r["question"]


@pytest.mark.parametrize("pct", FORGET_PCTS)
def test_embedded_forget_is_tail_and_retain_is_head(emb, pct):
    full = emb["full"]
    forget, retain = emb[f"forget{pct:02d}"], emb[f"retain{100 - pct}"]
    n_authors_forget = max(1, round(20 * pct / 100))
    assert len(forget) == 20 * n_authors_forget
    assert forget == full[len(full) - len(forget) :]
    assert retain == full[: len(full) - len(forget)]
    assert retain + forget == full
    assert _qa(emb[f"forget{pct:02d}_perturbed"]) == _qa(forget)


def test_embedded_forget_splits_are_nested(emb):
    f1, f5, f10 = (set(_qa(emb[f"forget{p:02d}"])) for p in FORGET_PCTS)
    assert f1 <= f5 <= f10


def test_embedded_retain_perturbed_is_the_first_rows_of_full(emb):
    rp = emb["retain_perturbed"]
    assert len(rp) == len(emb["full"]) // 10  # like the real 400 of 4000
    assert _qa(rp) == _qa(emb["full"][: len(rp)])
    assert not set(_qa(rp)) & set(_qa(emb["forget10"]))


def test_real_retain_perturbed_is_the_first_rows_of_full(real_tofu):
    full = load_tofu_split(real_tofu, "full")
    rp = load_tofu_split(real_tofu, "retain_perturbed")
    assert _qa(rp) == _qa(full[: len(rp)])


@pytest.mark.parametrize("pct", FORGET_PCTS)
def test_embedded_holdout_authors_are_not_in_full(emb, pct):
    holdout = emb[f"holdout{pct:02d}"]
    assert len(holdout) == len(emb[f"forget{pct:02d}"])
    holdout_authors = {_author_of(r) for r in holdout if " was born in " in r["answer"]}
    full_authors = {_author_of(r) for r in emb["full"] if " was born in " in r["answer"]}
    assert holdout_authors and len(holdout_authors) == len(holdout) // 20
    assert not holdout_authors & full_authors
    assert not any(a in r["question"] for a in holdout_authors for r in emb["full"])
    assert not set(_qa(holdout)) & set(_qa(emb["full"]))


def test_embedded_is_deterministic_for_a_seed():
    a, b = tofu_splits(6, seed=3), tofu_splits(6, seed=3)
    assert a == b
    assert tofu_splits(6, seed=4)["full"] != a["full"]
    assert load_tofu_split(None, "forget10_perturbed", num_authors=6, seed=3) == a["forget10_perturbed"]
    assert load_tofu_split("embedded", "full", num_authors=6, seed=3) == a["full"]


def test_embedded_needs_two_authors():
    with pytest.raises(ForgetfulError, match="at least 2 authors"):
        tofu_splits(1)


def test_embedded_two_authors_keep_one_to_retain():
    s = tofu_splits(2, seed=0)
    for pct in FORGET_PCTS:
        assert len(s[f"forget{pct:02d}"]) == 20
        assert len(s[f"retain{100 - pct}"]) == 20


# --------------------------------------------------------------------------------------------
# The real folder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "split,n",
    [
        ("full", 4000),
        ("forget10", 400),
        ("retain90", 3600),
        ("forget10_perturbed", 400),
        ("real_authors_perturbed", 100),
        ("world_facts_perturbed", 117),
    ],
)
def test_real_folder_row_counts(real_tofu, split, n):
    rows = load_tofu_split(real_tofu, split)
    assert len(rows) == n
    if split == "forget10_perturbed":
        assert all(len(r["perturbed_answer"]) == 5 for r in rows)
        assert set(rows[0]) >= PERTURBED_FIELDS
    if split in ("real_authors_perturbed", "world_facts_perturbed"):
        assert all(len(r["perturbed_answer"]) == 3 for r in rows)


def test_real_folder_split_relations(real_tofu):
    full = load_tofu_split(str(real_tofu), "full")
    forget = load_tofu_split(str(real_tofu), "forget10")
    retain = load_tofu_split(str(real_tofu), "retain90")
    assert _qa(forget) == _qa(full[-400:])
    assert _qa(retain) == _qa(full[:3600])


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_split_file(tmp_path):
    with pytest.raises(ForgetfulError, match=r"TOFU split 'forget10' is missing: .*forget10.json does not exist"):
        load_tofu_split(tmp_path, "forget10")


def test_missing_folder_is_not_called_a_file(tmp_path):
    missing = tmp_path / "no_such_tofu_folder"
    with pytest.raises(ForgetfulError) as info:
        load_tofu_split(missing, "full")
    msg = str(info.value)
    assert "got the file" not in msg, msg  # it is not a file: it does not exist
    assert "does not exist" in msg or "not found" in msg, msg


def test_unknown_split_embedded():
    with pytest.raises(ForgetfulError, match="unknown TOFU split 'forget20'; the splits are .*forget10"):
        load_tofu_split(None, "forget20", num_authors=4)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "full.json"
    f.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ForgetfulError, match="must be a folder of <split>.json files, got the file"):
        load_tofu_split(f, "full")


def test_split_lacking_required_fields(tmp_path):
    (tmp_path / "forget10_perturbed.json").write_text(
        "\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}", "paraphrased_question": "p"}) for i in range(3))
        + "\n"
    )
    with pytest.raises(ForgetfulError, match=r"lacks the field\(s\) paraphrased_answer, perturbed_answer"):
        load_tofu_split(tmp_path, "forget10_perturbed")
    (tmp_path / "world_facts_perturbed.json").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ForgetfulError, match=r"lacks the field\(s\) perturbed_answer"):
        load_tofu_split(tmp_path, "world_facts_perturbed")
    (tmp_path / "full.json").write_text(json.dumps({"question": "q", "text": "a"}) + "\n")
    with pytest.raises(ForgetfulError, match=r"lacks the field\(s\) answer"):
        load_tofu_split(tmp_path, "full")


def test_empty_split_file(tmp_path):
    (tmp_path / "full.json").write_text("")
    with pytest.raises(ForgetfulError, match="empty"):
        load_tofu_split(tmp_path, "full")


def test_hub_name_offline_fails_fast_with_one_line():
    start = time.monotonic()
    with pytest.raises(ForgetfulError) as info:
        load_tofu_split("locuslab/TOFU", "forget10")
    assert time.monotonic() - start < 15
    msg = str(info.value)
    assert "\n" not in msg
    assert "locuslab/TOFU" in msg
    assert "local copy" in msg
