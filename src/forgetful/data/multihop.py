"""Multi-hop questions over a passage, from the embedded generator's authors: a task where a
question-only heuristic must fail.

A row asks about an attribute of the author of a book, e.g. "In which city was the author of The
Silent River born?". Answering takes two hops through the passage:

* hop 1 names the author of the book ("The Silent River was written by Mira Velsen.");
* hop 2 states the attribute of that author ("Mira Velsen was born in Lisbon.").

The author (the *bridge*) never appears in the question, and the passage holds, in shuffled order,
distractor chains of other authors with the same relations (other books, other authors, the same
attributes), so words such as "written by" and "born" occur once per chain and a lexical match on
the question alone cannot single out hop 2. Every author of a passage also states the same few other
attributes (the bridge's own are distractors that name the bridge), and a few filler sentences
carry no fact at all.

Entities are unambiguous inside one passage: every author name, book title and attribute value
occurs in one sentence only (an author's name in that author's sentences only), so the answer
occurs exactly once. Across passages values repeat freely. Authors keep their generated facts
everywhere (a distractor author states the same values in every passage). ``part="eval"`` draws
the asked authors *and* the distractor authors from the last ``eval_authors`` authors only, and
``"train"`` from the others, so no eval row shares an author with a training row.

A row also carries the answer's opening in the relation's own words, its *cue* ("The author of The
Silent River was born in"): with ``answer_cue`` (the default) the answer starts with it and the
target is the entity that continues it. SmolLM2-135M-Instruct answers a bare question with a
sentence of its own ("The author of ... was born in ..."), so without the cue the target's first
token costs it ~11 nats with or without the passage (11.2 vs 11.5 on 40 eval rows), and the
target NLL measures the format more than the reading; with the cue the first token costs 4.5
nats on the whole passage, 8.1 on none and 0.6 on the two hops
(benchmarks/results/forget_cpu/multihop_gate*.json).

Everything is a pure function of the seed (authors: of ``author_seed``).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

from ..errors import ForgetfulError
from .embedded import ATTRIBUTES, Author, filler_sentence, make_authors, with_article

# The hop-2 relations and their two-hop question templates ({book}: the book of hop 1).
QUESTIONS: dict[str, str] = {
    "birthplace": "In which city was the author of {book} born?",
    "genre": "Which genre is the author of {book} known for?",
    "language": "In which language does the author of {book} write?",
    "award": "Which honour did the author of {book} receive?",  # "award" or "prize" would match values
    "hobby": "What does the author of {book} enjoy outside of writing?",
    "father_occupation": "What did the father of the author of {book} work as?",
    "mother_occupation": "What did the mother of the author of {book} work as?",
    "birth_date": "On what date was the author of {book} born?",
}
# The answer's opening in the relation's own words ({book}; the value follows): a reader continues it
# with the entity, as the embedded biographies' "Answer: Mira Velsen was born in" does.
CUES: dict[str, str] = {
    "birthplace": "The author of {book} was born in {v}.",
    "genre": "The author of {book} is known for writing {v}.",
    "language": "The author of {book} writes mainly in {v}.",
    "award": "The author of {book} received the {v}.",
    "hobby": "Outside of writing, the author of {book} enjoys {v}.",
    "father_occupation": "The father of the author of {book} worked as a {v}.",
    "mother_occupation": "The mother of the author of {book} worked as a {v}.",
    "birth_date": "The author of {book} was born on {v}.",
}
# The default relations: short answers a reader copies, whose cue ends on a word every chain's sentence
# of the relation has. Opt in: the occupations (their cue ends on "a" / "an", which tells the value's
# first letter apart, as the embedded generator's cues do) and dates (three-part values).
DEFAULT_ATTRIBUTES = ("birthplace", "genre", "language", "award", "hobby")
# Hop 1: book -> author.
HOP1_TEMPLATES = ("{book} was written by {name}.", "{name} wrote {book}.")
BOOK_ATTRIBUTES = ("first_book", "second_book")
# Relations whose values come from one pool: a passage states at most one of them, so that every
# value occurs once in it (16 distinct occupations across 8 authors are too many to find).
FAMILY = {"father_occupation": "occupation", "mother_occupation": "occupation"}
PARTS = ("train", "eval")
_FACTS = {a.name: a.facts[0] for a in ATTRIBUTES}


@dataclass(frozen=True)
class MultihopOptions:
    """The generator's sizes. Defaults give passages of ~300-450 tokens with a Llama-style BPE
    (SmolLM2's): 8 authors x (1 book sentence + 3 attribute sentences) + 4 filler sentences."""

    distractor_chains: int = 7  # other authors in the passage, each with a book and the same attributes
    facts_per_author: int = 3  # attribute sentences per author (the asked attribute always among them)
    filler: int = 4  # sentences that state no fact
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES  # the relations hop 2 may ask about
    num_authors: int = 200  # authors generated (make_authors(num_authors, author_seed))
    eval_authors: int = 40  # the last ones: the eval part's authors, never in a training row
    author_seed: int = 0
    # the answer opens with the row's cue ("The author of <book> was born in"), protected, and the
    # target continues it (" Lisbon"); False: the bare entity right after the question
    answer_cue: bool = True

    def __post_init__(self):
        object.__setattr__(self, "attributes", tuple(self.attributes))
        if not isinstance(self.answer_cue, bool):
            raise ForgetfulError(f"multihop answer_cue must be True or False, got {self.answer_cue!r}")
        for name in ("distractor_chains", "filler"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ForgetfulError(f"multihop {name} must be a non-negative integer, got {getattr(self, name)!r}")
        unknown = [a for a in self.attributes if a not in QUESTIONS]
        if not self.attributes or unknown:
            raise ForgetfulError(
                f"multihop attributes {list(unknown) or '()'} are not hop-2 relations; choose from {sorted(QUESTIONS)}"
            )
        if len(set(self.attributes)) != len(self.attributes):
            raise ForgetfulError(f"multihop attributes repeat: {list(self.attributes)}")
        families = len({FAMILY.get(a, a) for a in self.attributes})
        if not 1 <= self.facts_per_author <= families:
            raise ForgetfulError(
                f"multihop facts_per_author must be between 1 and the {families} relations of {list(self.attributes)} "
                f"(father's and mother's occupation count as one), got {self.facts_per_author}"
            )
        per_part = self.distractor_chains + 1  # the asked author and the distractors come from one part
        if self.eval_authors < per_part or self.num_authors - self.eval_authors < per_part:
            raise ForgetfulError(
                f"multihop needs at least {per_part} authors in each part (distractor_chains + 1); got "
                f"{self.num_authors - self.eval_authors} train and {self.eval_authors} eval authors of "
                f"num_authors={self.num_authors}: raise num_authors / eval_authors or lower distractor_chains"
            )

    def as_dict(self) -> dict:
        return {**asdict(self), "attributes": list(self.attributes)}


@dataclass(frozen=True)
class MultihopRow:
    """A passage (its sentences, in reading order), a two-hop question and its answer entity.
    ``hops`` = (index of the hop-1 sentence, index of the hop-2 sentence) in ``sentences``;
    ``group`` = the index of the asked author (the bridge) among the generated authors."""

    sentences: tuple[str, ...]
    question: str
    answer: str
    bridge: str
    book: str
    attribute: str
    hops: tuple[int, int]
    group: int
    distractors: tuple[str, ...] = field(default=())  # the other authors of the passage
    cue: str = ""  # the answer's opening, e.g. "The author of The Silent River was born in"

    @property
    def passage(self) -> str:
        return " ".join(self.sentences)

    def sentence_spans(self) -> list[tuple[int, int]]:
        """Character span of every sentence in :attr:`passage`."""
        spans, start = [], 0
        for s in self.sentences:
            spans.append((start, start + len(s)))
            start += len(s) + 1
        return spans

    def as_dict(self) -> dict:
        return {
            "sentences": list(self.sentences),
            "question": self.question,
            "answer": self.answer,
            "bridge": self.bridge,
            "book": self.book,
            "attribute": self.attribute,
            "hops": list(self.hops),
            "group": self.group,
            "distractors": list(self.distractors),
            "cue": self.cue,
        }


def attribute_sentence(author: Author, attribute: str) -> str:
    """``author``'s ``attribute`` stated with the name (never a pronoun: the passage is shuffled)."""
    name = author.name
    text = _FACTS[attribute].format(s=name, s_lower=name, p=name + "'s", P=name + "'s", v=author.values[attribute])
    return with_article(text)


def cue_for(attribute: str, book: str, value: str) -> str:
    """The answer's opening up to the value (an article before it agrees with the value, as in the
    embedded generator's cues)."""
    full = with_article(CUES[attribute].format(book=book, v=value))
    return full[: full.rfind(value)].rstrip()


def part_authors(options: MultihopOptions, part: str) -> list[tuple[int, Author]]:
    """``(index, author)`` of the authors of one part: eval = the last ``eval_authors``."""
    if part not in PARTS:
        raise ForgetfulError(f"multihop part must be train or eval, got {part!r}")
    authors = make_authors(options.num_authors, seed=options.author_seed)
    cut = options.num_authors - options.eval_authors
    indexed = list(enumerate(authors))
    return indexed[:cut] if part == "train" else indexed[cut:]


def _strings(author: Author, book: str, attributes: tuple[str, ...]) -> list[str]:
    return [author.name, book] + [author.values[a] for a in attributes]


def _fits(strings: list[str], used: set[str]) -> bool:
    return len(set(strings)) == len(strings) and not used.intersection(strings)


def title_words(book: str) -> set[str]:
    """The words of a title but "the", lower-cased."""
    return set(re.findall(r"\w+", book.lower())) - {"the"}


def _clear(author: Author, attributes, banned: set[str]) -> bool:
    """No value of ``attributes`` shares a word with the asked title (the "Golden Lantern Prize"
    beside the book "The Golden Lantern" would let a lexical match on the question find it)."""
    return not any(title_words(author.values[a]) & banned for a in attributes)


DRAWS = 50  # tries at distractor chains whose strings are unlike every other chain's


def draw_chains(
    asked: tuple[int, Author], attribute: str, pool: list[tuple[int, Author]], options: MultihopOptions, rng
) -> tuple[tuple[str, ...], list[tuple[Author, str]]] | None:
    """The attributes every author of the passage states (``attribute`` first) and the chains
    ``(author, book)``, the asked author's first; None when the pool has too few authors unlike
    one another (names, books and stated values, each once in the passage, and no stated value
    sharing a word with the asked book's title)."""
    index, author = asked
    book = author.values[rng.choice(BOOK_ATTRIBUTES)]
    banned = title_words(book)
    if not _clear(author, (attribute,), banned):
        return None
    others = [a for a in options.attributes if a != attribute]
    rng.shuffle(others)
    stated = [attribute]
    for a in others:
        if len(stated) == options.facts_per_author:
            break
        family = FAMILY.get(a, a)
        fresh = all(FAMILY.get(b, b) != family for b in stated) and _clear(author, (a,), banned)
        if fresh and _fits(_strings(author, book, (*stated, a)), set()):
            stated.append(a)
    if len(stated) < options.facts_per_author:
        return None
    stated = tuple(stated)
    used = set(_strings(author, book, stated))
    chains = [(author, book)]
    candidates = [a for i, a in pool if i != index]
    rng.shuffle(candidates)
    for other in candidates:
        if len(chains) > options.distractor_chains:
            break
        other_book = other.values[rng.choice(BOOK_ATTRIBUTES)]
        strings = _strings(other, other_book, stated)
        if _fits(strings, used) and _clear(other, stated, banned):
            used.update(strings)
            chains.append((other, other_book))
    return (stated, chains) if len(chains) > options.distractor_chains else None


def multihop_row(
    asked: tuple[int, Author], pool: list[tuple[int, Author]], options: MultihopOptions, rng: random.Random
) -> MultihopRow:
    """One row asking about ``asked``, with distractor chains of other authors of ``pool``."""
    index, author = asked
    for _ in range(DRAWS):
        attribute = rng.choice(options.attributes)
        drawn = draw_chains(asked, attribute, pool, options, rng)
        if drawn is not None:
            break
    else:
        raise ForgetfulError(
            f"{options.distractor_chains} distractor chains with names, books and {options.facts_per_author} "
            f"attribute values unlike every other chain's cannot be found among the {len(pool)} authors of a "
            "part: lower distractor_chains or facts_per_author, or raise num_authors / eval_authors"
        )
    stated, chains = drawn
    book = chains[0][1]
    # (sentence, role): role 1 = hop 1, 2 = hop 2, 0 = anything else
    items = []
    for k, (who, title) in enumerate(chains):
        items.append((rng.choice(HOP1_TEMPLATES).format(book=title, name=who.name), 1 if k == 0 else 0))
        items += [(attribute_sentence(who, a), 2 if k == 0 and a == attribute else 0) for a in stated]
    items += [(filler_sentence(rng), 0) for _ in range(options.filler)]
    rng.shuffle(items)
    sentences = tuple(s for s, _ in items)
    roles = [r for _, r in items]
    return MultihopRow(
        sentences=sentences,
        question=QUESTIONS[attribute].format(book=book),
        cue=cue_for(attribute, book, author.values[attribute]),
        answer=author.values[attribute],
        bridge=author.name,
        book=book,
        attribute=attribute,
        hops=(roles.index(1), roles.index(2)),
        group=index,
        distractors=tuple(who.name for who, _ in chains[1:]),
    )


def multihop_rows(
    n: int | None = None, *, part: str = "train", seed: int = 0, options: MultihopOptions | None = None
) -> list[MultihopRow]:
    """``n`` multi-hop rows of one part (default: one per author of the part). The asked authors
    cycle through the part's authors in a seeded order; distractors come from the same part."""
    options = options or MultihopOptions()
    pool = part_authors(options, part)
    if n is None:
        n = len(pool)
    if not isinstance(n, int) or n < 1:
        raise ForgetfulError(f"multihop needs n >= 1 rows, got {n!r}")
    rng = random.Random(f"multihop-{seed}-{part}")
    order: list[tuple[int, Author]] = []
    while len(order) < n:
        cycle = list(pool)
        rng.shuffle(cycle)
        order += cycle
    return [multihop_row(asked, pool, options, rng) for asked in order[:n]]
