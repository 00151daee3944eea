"""TOFU-shaped splits from the embedded generator, with the schema of the real benchmark
(``question``/``answer``, and for the ``*_perturbed`` splits ``paraphrased_answer``,
``paraphrased_question`` and five ``perturbed_answer`` made by swapping attribute values), plus small
real-authors and world-facts sets whose facts also appear in the pretraining corpus. A pure function
of the seed."""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..errors import ForgetfulError
from .embedded import ATTRIBUTES, Author, make_authors, random_value, with_article
from .embedded_words import REAL_AUTHORS, WORLD_CAPITALS

# --------------------------------------------------------------------------------------------
# TOFU-shaped splits
# --------------------------------------------------------------------------------------------

TOFU_FORGET_PERCENTS = (1, 5, 10)


def _tofu_rows(author: Author, rng: random.Random, perturbed: bool) -> list[dict]:
    rows = []
    for spec in ATTRIBUTES:
        v = author.values[spec.name]
        for q_template in spec.questions:
            row = {
                "question": q_template.format(name=author.name),
                "answer": with_article(spec.answer.format(name=author.name, v=v)),
            }
            if perturbed:
                wrong = set()
                while len(wrong) < 5:
                    w = random_value(spec.name, rng)
                    if w != v:
                        wrong.add(w)
                row["paraphrased_answer"] = with_article(spec.paraphrase.format(name=author.name, v=v))
                row["paraphrased_question"] = spec.paraphrased_question.format(name=author.name)
                row["perturbed_answer"] = [
                    with_article(spec.paraphrase.format(name=author.name, v=w)) for w in sorted(wrong)
                ]
            rows.append(row)
    return rows


def _options_rows(pairs: Sequence[tuple[str, str]], question: str, rng: random.Random) -> tuple[list, list]:
    plain, perturbed = [], []
    answers = [a for _, a in pairs]
    for key, answer in pairs:
        wrong = rng.sample([a for a in answers if a != answer], 3)
        options = wrong + [answer]
        rng.shuffle(options)
        q = question.format(key)
        plain.append({"question": q, **{f"option{i + 1}": o for i, o in enumerate(options)}, "answer": answer})
        perturbed.append({"question": q, "answer": answer, "perturbed_answer": wrong})
    return plain, perturbed


def tofu_splits(num_authors: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """Every TOFU split, with the real benchmark's schema and split relations:
    ``full`` = authors x 20 QA in author order; ``forgetXX`` the last XX% of authors (at least
    one); ``retainYY`` the rest; ``*_perturbed`` with paraphrases and 5 perturbed answers;
    ``retain_perturbed`` = the first 10% of ``full``; ``holdoutXX`` authors not in ``full``."""
    if num_authors < 2:
        raise ForgetfulError(f"TOFU needs at least 2 authors (one to forget, one to retain), got {num_authors}")
    authors = make_authors(num_authors, seed=10_000 + seed)
    rng = random.Random(f"tofu-{seed}")
    per_author = [_tofu_rows(a, rng, perturbed=True) for a in authors]
    full_p = [r for rows in per_author for r in rows]
    plain = lambda rows: [{"question": r["question"], "answer": r["answer"]} for r in rows]  # noqa: E731
    splits = {"full": plain(full_p)}
    n_per = len(per_author[0])
    holdout_authors = make_authors(num_authors, seed=20_000 + seed, exclude={a.name for a in authors})
    for pct in TOFU_FORGET_PERCENTS:
        k = max(1, round(num_authors * pct / 100))
        k = min(k, num_authors - 1)
        cut = (num_authors - k) * n_per
        splits[f"forget{pct:02d}"] = plain(full_p[cut:])
        splits[f"forget{pct:02d}_perturbed"] = full_p[cut:]
        splits[f"retain{100 - pct}"] = plain(full_p[:cut])
        splits[f"holdout{pct:02d}"] = plain([r for a in holdout_authors[:k] for r in _tofu_rows(a, rng, False)])
    n_retain_eval = max(n_per, len(full_p) // 10)
    splits["retain_perturbed"] = full_p[:n_retain_eval]
    splits["real_authors"], splits["real_authors_perturbed"] = _options_rows(REAL_AUTHORS, "Who wrote {}?", rng)
    splits["world_facts"], splits["world_facts_perturbed"] = _options_rows(
        WORLD_CAPITALS, "What is the capital of {}?", rng
    )
    return splits
