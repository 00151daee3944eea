"""The multi-hop generator: rows are a pure function of the seed, the bridge is only in the passage,
every entity occurs once per passage, the hops sit anywhere in shuffled order, a question-only
lexical match cannot single out hop 2, and train and eval share no author."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from forgetful.data.embedded import make_authors
from forgetful.data.multihop import CUES, QUESTIONS, MultihopOptions, attribute_sentence, multihop_rows, part_authors
from forgetful.errors import ForgetfulError

OPTIONS = MultihopOptions()
AUTHORS = {a.name: a for a in make_authors(OPTIONS.num_authors, seed=OPTIONS.author_seed)}


@pytest.fixture(scope="module")
def rows():
    return multihop_rows(part="train", seed=0) + multihop_rows(part="eval", seed=0)


def occurrences(text: str, entity: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(entity)}(?!\w)", text))


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def test_rows_are_a_pure_function_of_the_seed():
    a = [r.as_dict() for r in multihop_rows(30, part="eval", seed=3)]
    assert a == [r.as_dict() for r in multihop_rows(30, part="eval", seed=3)]
    assert a != [r.as_dict() for r in multihop_rows(30, part="eval", seed=4)]


def test_default_rows_ask_each_author_of_the_part_once(rows):
    train, held = rows[:160], rows[160:]
    assert len(rows) == OPTIONS.num_authors
    assert sorted(r.group for r in train) == list(range(160))
    assert sorted(r.group for r in held) == list(range(160, 200))
    more = multihop_rows(100, part="eval")  # more rows than authors: the authors cycle
    assert set(Counter(r.group for r in more).values()) <= {2, 3} and len({r.group for r in more}) == 40


def test_a_row_is_two_hops_through_a_bridge_absent_from_the_question(rows):
    for r in rows:
        author = AUTHORS[r.bridge]
        hop1, hop2 = (r.sentences[i] for i in r.hops)
        assert r.bridge not in r.question and r.book in r.question
        assert r.question == QUESTIONS[r.attribute].format(book=r.book)
        assert r.book in (author.values["first_book"], author.values["second_book"])
        assert r.book in hop1 and r.bridge in hop1 and r.answer not in hop1
        assert hop2 == attribute_sentence(author, r.attribute) and r.answer == author.values[r.attribute]
        assert r.answer not in r.question
        # the cue opens the answer in the relation's words: the book, never the bridge or the answer
        assert r.book in r.cue and r.bridge not in r.cue and r.answer not in r.cue
        assert f"{r.cue} {r.answer}." == CUES[r.attribute].format(book=r.book, v=r.answer)
        assert len(r.sentences) == (OPTIONS.distractor_chains + 1) * (1 + OPTIONS.facts_per_author) + OPTIONS.filler
        assert r.passage == " ".join(r.sentences)
        assert [r.passage[s:e] for s, e in r.sentence_spans()] == list(r.sentences)


def test_every_entity_occurs_once_in_its_passage(rows):
    for r in rows:
        passage = r.passage
        assert occurrences(passage, r.answer) == 1 and occurrences(passage, r.book) == 1
        names = (r.bridge, *r.distractors)
        assert len(set(names)) == len(names) == OPTIONS.distractor_chains + 1
        for name in names:
            author = AUTHORS[name]
            # its own sentences only: one book sentence and the same attributes as everyone else
            mine = [s for s in r.sentences if occurrences(s, name)]
            assert len(mine) == 1 + OPTIONS.facts_per_author and all(occurrences(s, name) == 1 for s in mine)
            stated = [a for a in QUESTIONS if attribute_sentence(author, a) in r.sentences]
            assert r.attribute in stated and len(stated) == OPTIONS.facts_per_author
            for a in stated:
                assert occurrences(passage, author.values[a]) == 1, (name, a, author.values[a])
            # one of its books, named once (its other title may be another author's book here)
            books = {author.values["first_book"], author.values["second_book"]}
            named = [b for b in books for s in mine if occurrences(s, b)]
            assert len(named) == 1 and occurrences(passage, named[0]) == 1


def test_no_stated_value_shares_a_word_with_the_asked_title(rows):
    for r in rows:
        title = words(r.book) - {"the"}
        others = [s for i, s in enumerate(r.sentences) if i != r.hops[0] and r.book not in s]
        values = [v for n in (r.bridge, *r.distractors) for v in AUTHORS[n].values.values() if v in r.passage]
        assert not any(title & words(v) for v in values if not v.startswith("The ")), r.book
        assert all(occurrences(s, r.book) == 0 for s in others)


def test_every_chain_states_the_relation_asked_about(rows):
    """The relation words of the question ("born", "written by") occur once per chain."""
    for r in rows:
        for name in r.distractors:
            assert attribute_sentence(AUTHORS[name], r.attribute) in r.sentences


def test_a_question_only_lexical_match_cannot_single_out_hop_2(rows):
    """Ranked by word overlap with the question and the cue (the protected part of the row), hop 2 is
    tied with or beaten by at least one sentence of every distractor chain; on the question alone,
    hop 1 (it holds the book's title) ranks first."""
    for r in rows:
        hop1, hop2 = r.hops
        overlap = [len((words(r.question) | words(r.cue)) & words(s)) for s in r.sentences]
        rivals = sum(o >= overlap[hop2] for i, o in enumerate(overlap) if i != hop2)
        assert rivals >= OPTIONS.distractor_chains, (r.question, r.sentences[hop2])
        on_question = [len(words(r.question) & words(s)) for s in r.sentences]
        assert on_question[hop1] == max(on_question)


def test_the_hops_are_shuffled_anywhere_in_the_passage(rows):
    n = len(rows[0].sentences)
    firsts = [r.hops[0] < r.hops[1] for r in rows]
    assert 0.3 < sum(firsts) / len(rows) < 0.7  # both orders, about equally often
    for k in (0, 1):
        places = Counter(r.hops[k] for r in rows)
        assert len(places) > n // 2  # spread over the passage
        assert places[0] + places[n - 1] < len(rows) // 4  # not pinned to the first or last sentence
    assert len({r.attribute for r in rows}) == len(OPTIONS.attributes)


def test_train_and_eval_share_no_author():
    train = multihop_rows(part="train", seed=0)
    held = multihop_rows(part="eval", seed=5)  # another passage seed: the authors are the same split
    names = lambda rs: {n for r in rs for n in (r.bridge, *r.distractors)}  # noqa: E731
    assert names(train).isdisjoint(names(held))
    assert {r.group for r in train}.isdisjoint({r.group for r in held})
    assert names(held) <= {a.name for _, a in part_authors(OPTIONS, "eval")}


def test_sizes_are_options():
    small = MultihopOptions(distractor_chains=2, facts_per_author=1, filler=0, attributes=("birthplace",))
    for r in multihop_rows(20, part="eval", options=small):
        assert len(r.sentences) == 3 * 2 and r.attribute == "birthplace"
        assert len(r.distractors) == 2
        assert all("was written by" in s or " wrote " in s or "was born in" in s for s in r.sentences)
    dates = MultihopOptions(attributes=("birth_date",), facts_per_author=1)
    r = multihop_rows(1, part="eval", options=dates)[0]
    assert r.question.startswith("On what date") and re.fullmatch(r"\d+ [A-Z][a-z]+ \d{4}", r.answer)
    assert r.cue.endswith("was born on")
    # opt-in occupations: one of father / mother per passage (one pool of values), the article agreeing
    jobs = MultihopOptions(attributes=("father_occupation", "mother_occupation", "birthplace"), facts_per_author=2)
    for r in multihop_rows(40, part="train", options=jobs):
        stated = {a for a in QUESTIONS if attribute_sentence(AUTHORS[r.bridge], a) in r.sentences}
        assert "birthplace" in stated and len(stated & {"father_occupation", "mother_occupation"}) == 1
        if r.attribute != "birthplace":
            assert r.cue.endswith(" an" if r.answer[0] in "aeiou" else " a")


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(distractor_chains=-1), "distractor_chains must be a non-negative integer"),
        (dict(filler=-2), "filler must be a non-negative integer"),
        (dict(facts_per_author=0), "facts_per_author must be between 1"),
        (dict(facts_per_author=6), "between 1 and the 5 relations"),
        (
            dict(attributes=("birthplace", "father_occupation", "mother_occupation"), facts_per_author=3),
            "father's and mother's occupation count as one",
        ),
        (dict(answer_cue="yes"), "answer_cue must be True or False"),
        (dict(attributes=("birthplace", "height")), r"\['height'\] are not hop-2 relations"),
        (dict(attributes=()), "are not hop-2 relations"),
        (dict(attributes=("genre", "genre")), "attributes repeat"),
        (dict(eval_authors=5), "at least 8 authors in each part"),
        (dict(num_authors=45, eval_authors=40), "at least 8 authors in each part"),
    ],
)
def test_bad_options_fail_with_the_fix(kw, message):
    with pytest.raises(ForgetfulError, match=message):
        MultihopOptions(**kw)


def test_bad_calls_fail_with_the_fix():
    with pytest.raises(ForgetfulError, match="part must be train or eval"):
        multihop_rows(3, part="test")
    with pytest.raises(ForgetfulError, match="n >= 1 rows"):
        multihop_rows(0)
    # 13 distinct awards in one passage, from a pool of 12: no passage can be made
    crowded = MultihopOptions(distractor_chains=12, facts_per_author=1, attributes=("award",))
    with pytest.raises(ForgetfulError, match="lower distractor_chains or facts_per_author"):
        multihop_rows(1, part="eval", options=crowded)
