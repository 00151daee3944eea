"""Builders of per-token loss masks (1 = the token is trained, 0 = it is forgotten).

Each builder works on one example's token ids (or its tokenizer offsets) and returns a NumPy
``int8`` array of the same length; :mod:`forgetful.loss.tasks` combines them (logical AND).

* :func:`completion_only` - train only the completion (answer) tokens;
* :func:`random_mask` - forget each token with probability ``p`` (seeded per example);
* :func:`goldfish_mask` - Goldfish loss: forget a token when a hash of the ``h`` tokens before it
  falls in a 1/k bucket, so a passage seen twice is masked the same way both times;
* :func:`span_mask` - forget the tokens that overlap given character spans;
* :func:`fact_spans` - character spans of facts and entities: the entities of a spaCy pipeline
  (an object, or the name of an installed one), else a rule-based fallback (names, titles,
  numbers, dates, quotes).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from ..errors import ForgetfulError, check_probability
from ..tokens import overlap_mask

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def completion_only(prompt_length: int, length: int) -> np.ndarray:
    """1 on positions ``>= prompt_length``."""
    if not 0 <= prompt_length <= length:
        raise ForgetfulError(f"prompt length {prompt_length} must lie in [0, {length}]")
    mask = np.zeros(length, dtype=np.int8)
    mask[prompt_length:] = 1
    return mask


def random_mask(length: int, p: float, seed: int) -> np.ndarray:
    """Forget each token independently with probability ``p`` (0 = forgotten)."""
    check_probability("random mask p", p, allow_one=True)
    rng = np.random.default_rng(seed)
    return (rng.random(length) >= p).astype(np.int8)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mixer (splitmix64 finaliser), vectorised; wraps modulo 2**64."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def goldfish_mask(input_ids: Sequence[int] | np.ndarray, k: int = 4, h: int = 13) -> np.ndarray:
    """Goldfish loss (Hans et al., 2024), hashed variant: token ``t`` is forgotten iff a hash of
    the ``h`` tokens before it is 0 modulo ``k``. About 1/k of tokens are dropped, and the same
    context always drops the same token. Tokens with fewer than ``h`` predecessors hash what
    there is."""
    if k < 2:
        raise ForgetfulError(f"goldfish k must be at least 2 (drop 1 token in k), got {k}")
    if h < 1:
        raise ForgetfulError(f"goldfish context width h must be at least 1, got {h}")
    ids = np.asarray(input_ids, dtype=np.int64)
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    # windows[t] = ids[t-h .. t-1], with a sentinel where t-h < 0
    padded = np.concatenate([np.full(h, -1, dtype=np.int64), ids])
    windows = np.lib.stride_tricks.sliding_window_view(padded, h)[:n].astype(np.uint64)
    acc = np.zeros(n, dtype=np.uint64)
    for j in range(h):  # h is small (13); the loop runs over window offsets, not tokens
        acc = _splitmix64(acc ^ windows[:, j])
    return (acc % np.uint64(k) != 0).astype(np.int8)


def span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """0 on tokens whose character offsets overlap any of ``spans`` (to forget them), else 1."""
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if (sp[:, 1] < sp[:, 0]).any() or (sp < 0).any():
        raise ForgetfulError(f"character spans must be (start, end) with 0 <= start <= end, got {sp.tolist()}")
    return (~overlap_mask(offsets, spans)).astype(np.int8)


# --------------------------------------------------------------------------------------------
# Fact / entity spans
# --------------------------------------------------------------------------------------------

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_CONNECTORS = r"(?:of|de|la|del|da|du|van|von|der|and|the|le|y)"
_CAP = r"[A-Z](?:[\w\-]|['\u2019](?=\w))*"  # an apostrophe only inside a word (O'Brien), not a closing quote
_FACT_PATTERNS = [
    re.compile(
        r"(?<!\w)[\"\u201c\u2018']([^\"\u201d\u2019']{2,80})[\"\u201d\u2019'](?!\w)"
    ),  # quoted titles, not possessives
    re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:{_MONTHS})(?:,?\s+\d{{3,4}})?"),  # 25 February 1958
    re.compile(rf"\b(?:{_MONTHS})\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{3,4}})?"),  # February 25, 1958
    re.compile(r"\b\d[\d,.:/\-]*\b"),  # numbers and years
    re.compile(rf"\b{_CAP}(?:\s+(?:{_CONNECTORS}\s+)*{_CAP})*"),  # capitalised names and titles
]
# Capitalised words that start sentences without naming anything.
_NOT_ENTITIES = frozenset(
    [
        "The",
        "A",
        "An",
        "In",
        "On",
        "At",
        "By",
        "For",
        "From",
        "Of",
        "With",
        "As",
        "And",
        "But",
        "Or",
        "Yes",
        "No",
        "This",
        "That",
        "These",
        "Those",
        "It",
        "Its",
        "He",
        "She",
        "They",
        "His",
        "Her",
        "Their",
        "Him",
        "Them",
        "We",
        "You",
        "I",
        "My",
        "Our",
        "Your",
        "There",
        "Here",
        "When",
        "Where",
        "What",
        "Which",
        "Who",
        "Why",
        "How",
        "After",
        "Before",
        "Although",
        "Because",
        "While",
        "During",
        "Since",
        "Some",
        "Many",
        "Most",
        "Each",
        "Every",
        "All",
        "Both",
        "Outside",
        "Later",
        "Question",
        "Answer",
        "Is",
        "Was",
        "Are",
        "Were",
        "Has",
        "Have",
        "Had",
        "Do",
        "Does",
        "Did",
        "Not",
    ]
)


def _rule_based_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for pattern in _FACT_PATTERNS:
        for m in pattern.finditer(text):
            start, end = m.span(1) if pattern.groups else m.span()
            words = text[start:end].split()
            # At a sentence start, drop leading function words ("The", "She") from a capitalised run.
            sentence_start = bool(re.search(r"(?:^|[.!?:\n])\s*$", text[:start]))
            while words and words[0] in _NOT_ENTITIES and pattern is _FACT_PATTERNS[-1] and sentence_start:
                start = text.index(words[0], start) + len(words[0])
                while start < end and text[start].isspace():
                    start += 1
                words = words[1:]
            if words and end > start:
                spans.append((start, end))
    return merge_spans(spans)


def merge_spans(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of overlapping or touching spans, sorted."""
    out: list[list[int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


@functools.cache
def spacy_pipeline(name: str):
    try:
        import spacy
    except ImportError:
        raise ForgetfulError(
            f"spaCy is not installed, so the pipeline '{name}' cannot be used; "
            "pip install 'forgetful[spacy]' and the pipeline, or leave spacy_model unset for the "
            "rule-based fact finder"
        ) from None
    try:
        return spacy.load(name)
    except OSError:
        raise ForgetfulError(
            f"the spaCy pipeline '{name}' is not installed (python -m spacy download {name}); "
            "leave spacy_model unset to use the rule-based fact finder"
        ) from None


def fact_spans(text: str, spacy_model=None) -> list[tuple[int, int]]:
    """Character spans of facts and entities in ``text``: the entities of a spaCy pipeline when
    ``spacy_model`` is one (a loaded ``Language``, e.g. ``spacy.blank("en")`` with an entity ruler)
    or names an installed one (``"en_core_web_sm"``), otherwise rule-based (capitalised names and
    titles, quoted titles, numbers, dates)."""
    if spacy_model is None or (isinstance(spacy_model, str) and not spacy_model):
        return _rule_based_spans(text)
    nlp = spacy_pipeline(spacy_model) if isinstance(spacy_model, str) else spacy_model
    if not callable(nlp):
        raise ForgetfulError(f"spacy_model must be a spaCy pipeline or its name, got {type(spacy_model).__name__}")
    doc = nlp(text)
    return merge_spans([(ent.start_char, ent.end_char) for ent in doc.ents])
