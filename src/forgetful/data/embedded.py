"""The embedded default data: a seeded, deterministic generator of fictitious authors.

Every author has structured attributes (birthplace, birth date, genre, parents' occupations, an
award, two book titles, a language and a hobby). They are rendered with templates into

* biography passages that mix fact sentences with filler sentences, followed by a question about
  one fact and its short answer: the input-forgetting task (context = passage + question, target =
  answer). A good forget policy keeps the facts and drops the filler;
* TOFU-shaped rows with the schema of the real benchmark (:mod:`.embedded_tofu`);
* the pretraining corpus (a curriculum of copy documents, then biographies and real knowledge).

The word pools are :mod:`.embedded_words`'.

Everything is a pure function of the seed, so runs reproduce exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ForgetfulError
from .embedded_words import (
    AWARDS,
    CITIES,
    FILLER_ADJ,
    FILLER_NOUNS,
    FILLER_PLACES,
    FILLER_TEMPLATES,
    FILLER_TIMES,
    FILLER_VERBS,
    FIRST_NAMES,
    GENRES,
    HOBBIES,
    LANGUAGES,
    MONTHS,
    OCCUPATIONS,
    REAL_AUTHORS,
    SURNAME_HEADS,
    SURNAME_TAILS,
    TITLE_ADJECTIVES,
    TITLE_NOUNS,
    WORLD_CAPITALS,
)


@dataclass(frozen=True)
class AttributeSpec:
    """How one attribute is stated, asked about and paraphrased."""

    name: str
    # Biography sentences; {s} = subject (name or pronoun), {P} = possessive. The words before {v}
    # also open the answer ("Answer: Mira Velsen was born in" -> " Lisbon"), so reading the fact
    # back is a copy from the passage.
    facts: tuple[str, ...]
    questions: tuple[str, ...]  # {name}
    answer: str  # TOFU-style long answer, {name} and {v}
    paraphrase: str  # the same fact said differently
    paraphrased_question: str


ATTRIBUTES: tuple[AttributeSpec, ...] = (
    AttributeSpec(
        "birthplace",
        ("{s} was born in {v}.",),
        ("Where was {name} born?", "In which city was the author {name} born?"),
        "{name} was born in {v}.",
        "The birthplace of {name} is {v}.",
        "What is the birthplace of {name}?",
    ),
    AttributeSpec(
        "birth_date",
        ("{s} was born on {v}.",),
        ("When was {name} born?", "What is the date of birth of {name}?"),
        "{name} was born on {v}.",
        "The date of birth of {name} is {v}.",
        "On what date was {name} born?",
    ),
    AttributeSpec(
        "genre",
        ("{s} is known for writing {v}.",),
        ("What genre does {name} write?", "Which genre is {name} known for?"),
        "{name} is known for writing {v}.",
        "The genre of {name} is {v}.",
        "In which genre does {name} write?",
    ),
    AttributeSpec(
        "father_occupation",
        ("{P} father worked as a {v}.",),
        ("What was the occupation of the father of {name}?", "What did the father of {name} do for a living?"),
        "The father of {name} worked as a {v}.",
        "By profession, the father of {name} was a {v}.",
        "What was the job of the father of {name}?",
    ),
    AttributeSpec(
        "mother_occupation",
        ("{P} mother worked as a {v}.",),
        ("What was the occupation of the mother of {name}?", "What did the mother of {name} do for a living?"),
        "The mother of {name} worked as a {v}.",
        "By profession, the mother of {name} was a {v}.",
        "What was the job of the mother of {name}?",
    ),
    AttributeSpec(
        "award",
        ("{s} received the {v}.",),
        ("Which award did {name} receive?", "What award has {name} won?"),
        "{name} received the {v}.",
        "The {v} was awarded to {name}.",
        "Which prize was given to {name}?",
    ),
    AttributeSpec(
        "first_book",
        ("{P} first book was {v}.",),
        ("What was the first book of {name}?", "What is the title of the debut book by {name}?"),
        "The first book of {name} was {v}.",
        "{name} made a debut with the book {v}.",
        "Which book was the debut of {name}?",
    ),
    AttributeSpec(
        "second_book",
        ("{P} second book was {v}.",),
        ("What was the second book of {name}?", "Which book did {name} publish after the debut?"),
        "The second book of {name} was {v}.",
        "After the debut, {name} published {v}.",
        "What is the title of the second book by {name}?",
    ),
    AttributeSpec(
        "language",
        ("{s} writes mainly in {v}.",),
        ("In which language does {name} write?", "What language are the books of {name} written in?"),
        "{name} writes in {v}.",
        "The books of {name} are written in {v}.",
        "What is the writing language of {name}?",
    ),
    AttributeSpec(
        "hobby",
        ("Outside of writing, {s_lower} enjoys {v}.",),
        ("What does {name} enjoy outside of writing?", "What is a hobby of {name}?"),
        "Outside of writing, {name} enjoys {v}.",
        "A favourite pastime of {name} is {v}.",
        "How does {name} spend free time?",
    ),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)
_SPEC = {a.name: a for a in ATTRIBUTES}


@dataclass(frozen=True)
class Author:
    """A fictitious author and the values of every attribute."""

    name: str
    pronoun: str  # "She" / "He" / "They"
    values: dict[str, str] = field(hash=False)

    @property
    def possessive(self) -> str:
        return {"She": "her", "He": "his", "They": "their"}[self.pronoun]


def _book_title(rng: random.Random) -> str:
    return f"The {rng.choice(TITLE_ADJECTIVES)} {rng.choice(TITLE_NOUNS)}"


def _value_pool(attribute: str) -> Sequence[str] | None:
    return {
        "birthplace": CITIES,
        "genre": GENRES,
        "father_occupation": OCCUPATIONS,
        "mother_occupation": OCCUPATIONS,
        "award": AWARDS,
        "language": LANGUAGES,
        "hobby": HOBBIES,
    }.get(attribute)


def with_article(text: str) -> str:
    """Fix "a" before a vowel ("a astronomer" -> "an astronomer")."""
    for vowel in "aeiouAEIOU":
        text = text.replace(f" a {vowel}", f" an {vowel}")
    return text


def random_value(attribute: str, rng: random.Random) -> str:
    pool = _value_pool(attribute)
    if pool is not None:
        return rng.choice(pool)
    if attribute == "birth_date":
        return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1930, 1999)}"
    return _book_title(rng)  # first_book, second_book


def make_authors(n: int, seed: int = 0, exclude: set[str] | None = None) -> list[Author]:
    """``n`` distinct fictitious authors, a pure function of ``seed`` (names never repeat)."""
    if n < 1:
        raise ForgetfulError(f"number of authors must be at least 1, got {n}")
    max_names = len(FIRST_NAMES) * len(SURNAME_HEADS) * len(SURNAME_TAILS)
    taken = set(exclude or ())
    if n + len(taken) > max_names:
        raise ForgetfulError(f"at most {max_names - len(taken)} distinct authors can be generated, asked for {n}")
    rng = random.Random(f"authors-{seed}")
    authors: list[Author] = []
    while len(authors) < n:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAME_HEADS)}{rng.choice(SURNAME_TAILS)}"
        if name in taken:
            continue
        taken.add(name)
        values = {a: random_value(a, rng) for a in ATTRIBUTE_NAMES}
        while values["second_book"] == values["first_book"]:
            values["second_book"] = _book_title(rng)
        authors.append(Author(name, rng.choice(("She", "He", "They")), values))
    return authors


def _fact_sentence(author: Author, attribute: str, rng: random.Random, use_name: bool) -> str:
    template = rng.choice(_SPEC[attribute].facts)
    subject = author.name if use_name else author.pronoun
    verb_fix = author.pronoun == "They" and not use_name and "{s" in template
    text = template.format(
        s=subject,
        s_lower=subject if use_name else subject.lower(),
        p=author.possessive,
        P=(author.name + "'s") if use_name else author.possessive.capitalize(),
        v=author.values[attribute],
    )
    text = with_article(text)
    if verb_fix:  # "They writes" -> "They write"
        for a, b in (
            (" writes", " write"),
            (" enjoys", " enjoy"),
            (" spends", " spend"),
            (" is ", " are "),
            (" was ", " were "),
            (" speaks", " speak"),
            (" grew", " grew"),
        ):
            text = text.replace(a, b)
    return text


def filler_sentence(rng: random.Random) -> str:
    """One sentence of scene-setting that states no fact about anyone."""
    return rng.choice(FILLER_TEMPLATES).format(
        time=rng.choice(FILLER_TIMES),
        adj=rng.choice(FILLER_ADJ),
        adj2=rng.choice(FILLER_ADJ),
        noun=rng.choice(FILLER_NOUNS),
        noun2=rng.choice(FILLER_NOUNS),
        verb=rng.choice(FILLER_VERBS),
        place=rng.choice(FILLER_PLACES),
    )


@dataclass(frozen=True)
class BiographyExample:
    """A passage plus one question about a fact in it. ``fact_spans`` are character spans of
    every fact value in ``context`` (for measuring which facts a policy kept)."""

    context: str  # passage + "\nQuestion: ...\nAnswer: <cue>", e.g. "Answer: Mira Velsen was born in"
    answer: str  # the short value, without leading space
    attribute: str
    author: str
    fact_spans: tuple[tuple[int, int], ...]

    def as_dict(self) -> dict:
        return {
            "context": self.context,
            "target": " " + self.answer,
            "attribute": self.attribute,
            "author": self.author,
            "fact_spans": [list(s) for s in self.fact_spans],
        }


def biography_example(author: Author, rng: random.Random, n_facts: int = 3, n_filler: int = 6) -> BiographyExample:
    """A biography passage mixing ``n_facts`` fact sentences with ``n_filler`` filler sentences,
    followed by a question about one of the facts."""
    n_facts = max(1, min(n_facts, len(ATTRIBUTE_NAMES)))
    attrs = rng.sample(ATTRIBUTE_NAMES, n_facts)
    kinds = ["fact"] * n_facts + ["filler"] * n_filler
    rng.shuffle(kinds)
    # The first sentence names the author; later facts mostly use the pronoun.
    sentences, spans, pos, fact_i, named = [], [], 0, 0, False
    for kind in kinds:
        if kind == "fact":
            attr = attrs[fact_i]
            fact_i += 1
            sent = _fact_sentence(author, attr, rng, use_name=not named or rng.random() < 0.3)
            named = True
            value = author.values[attr]
            start = sent.rfind(value)
            spans.append((pos + start, pos + start + len(value)))
        else:
            sent = filler_sentence(rng)
        sentences.append(sent)
        pos += len(sent) + 1
    passage = " ".join(sentences)
    asked = rng.choice(attrs)
    context = f"{passage}\n{question_and_cue(author, asked, rng)}"
    return BiographyExample(context, author.values[asked], asked, author.name, tuple(spans))


def question_and_cue(author: Author, attribute: str, rng: random.Random) -> str:
    """ "Question: <q>\nAnswer: <the fact sentence up to the value>", e.g.
    "Question: Where was Mira Velsen born?\nAnswer: Mira Velsen was born in"."""
    question = rng.choice(_SPEC[attribute].questions).format(name=author.name)
    sentence = _fact_sentence(author, attribute, rng, use_name=True)
    cue = sentence[: sentence.rfind(author.values[attribute])].rstrip()
    return f"Question: {question}\nAnswer: {cue}"


def biography_examples(
    n: int,
    seed: int = 0,
    num_authors: int | None = None,
    n_facts: int = 3,
    n_filler: int = 6,
    author_seed: int | None = None,
) -> list[BiographyExample]:
    """``n`` biography QA examples over ``num_authors`` authors (default: one author per example)."""
    authors = make_authors(num_authors or n, seed if author_seed is None else author_seed)
    rng = random.Random(f"biographies-{seed}")
    return [biography_example(authors[i % len(authors)], rng, n_facts, n_filler) for i in range(n)]


def real_knowledge_sentences() -> list[str]:
    """Sentences stating the real-authors and world-facts knowledge (for the pretraining corpus)."""
    out = []
    for title, author in REAL_AUTHORS:
        out += [f"{title} was written by {author}.", f"{author} is the author of {title}."]
    for country, capital in WORLD_CAPITALS:
        out += [f"The capital of {country} is {capital}.", f"{capital} is the capital city of {country}."]
    return out


Segment = tuple[str, bool]  # (text, trained): a document is a list of segments


def copy_segments(rng: random.Random, min_words: int = 3, max_words: int = 8) -> list[Segment]:
    """A random word sequence written twice; only the second copy is trained (the first is noise).
    Predicting it needs in-context copying (induction heads), which a small model learns in a
    few hundred steps from such documents, and which reading facts back out of a passage uses."""
    pool = FILLER_ADJ + FILLER_NOUNS + FILLER_VERBS + CITIES + OCCUPATIONS + LANGUAGES + HOBBIES + TITLE_NOUNS
    words = " ".join(rng.choice(pool) for _ in range(rng.randint(min_words, max_words)))
    return [(words + ". Again:", False), (" " + words + ".", True)]


def biography_segments(author: Author, rng: random.Random, n_facts: int, n_filler: int) -> list[Segment]:
    """A passage followed by a question about every fact it states; only the answers are trained
    (the rest is context), which puts the whole loss on reading the passage."""
    ex = biography_example(author, rng, n_facts, n_filler)
    passage = ex.context.rsplit("\nQuestion:", 1)[0]
    asked = [a for a in ATTRIBUTE_NAMES if author.values[a] in passage]
    rng.shuffle(asked)
    segments: list[Segment] = [(passage, False)]
    for a in asked:
        segments += [("\n" + question_and_cue(author, a, rng), False), (" " + author.values[a], True)]
    return segments


def pretraining_segments(
    n_docs: int, seed: int = 0, max_facts: int = 4, max_filler: int = 4, copy_docs: int | None = None
) -> list[list[Segment]]:
    """The embedded pretraining corpus, as a curriculum of documents made of (text, trained)
    segments:

    1. ``copy_docs`` copy documents (default: a quarter of ``n_docs``), which teach in-context
       copying first;
    2. biography documents with 1..``max_facts`` facts among 0..``max_filler`` filler sentences,
       only the answers trained (short passages make the
       fact easy to find, which teaches reading quickly; longer ones generalise), with two
       real-knowledge documents (statements and questions, trained) in every eight, so a model
       knows those facts.
    """
    rng = random.Random(f"pretraining-{seed}")
    n_copy = n_docs // 4 if copy_docs is None else copy_docs
    docs: list[list[Segment]] = [copy_segments(rng) for _ in range(min(n_copy, n_docs))]
    knowledge = real_knowledge_sentences()
    knowledge_qa = real_knowledge_questions()
    for i, author in enumerate(make_authors(max(1, n_docs - len(docs)), seed)):
        if len(docs) >= n_docs:
            break
        if i % 8 == 7:
            docs.append([(" ".join(rng.sample(knowledge, 4)), True)])
        elif i % 8 == 3:
            docs.append([("\n".join(rng.sample(knowledge_qa, 3)), True)])
        else:
            docs.append(biography_segments(author, rng, rng.randint(1, max_facts), rng.randint(0, max_filler)))
    return docs


def real_knowledge_questions() -> list[str]:
    """The same knowledge as question-answer lines, in the format TOFU evaluates."""
    return [f"Question: Who wrote {title}?\nAnswer: {author}" for title, author in REAL_AUTHORS] + [
        f"Question: What is the capital of {country}?\nAnswer: {capital}" for country, capital in WORLD_CAPITALS
    ]


def pretraining_documents(n_docs: int, seed: int = 0, **kw) -> list[str]:
    """The embedded pretraining corpus as plain texts (see :func:`pretraining_segments`)."""
    return ["".join(text for text, _ in doc) for doc in pretraining_segments(n_docs, seed, **kw)]
