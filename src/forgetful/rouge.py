"""ROUGE of generated answers against references (``rouge-score``, Porter stemming): the
answer-quality measure of the TOFU benchmark (open-unlearning reports ROUGE-L recall, and keeps
ROUGE-1 recall and ROUGE-L F1 beside it) and of question answering over compressed context."""

from __future__ import annotations

import functools
from collections.abc import Sequence


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_scores(generations: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1 recall (``rouge1_recall``), ROUGE-L F1 (``rougeL_f1``) and ROUGE-L recall
    (``rouge``) of each generation against its reference."""
    out: dict[str, list[float]] = {"rouge1_recall": [], "rougeL_f1": [], "rouge": []}
    for gen, ref in zip(generations, references):
        s = _scorer().score(ref, gen)
        out["rouge1_recall"].append(float(s["rouge1"].recall))
        out["rougeL_f1"].append(float(s["rougeL"].fmeasure))
        out["rouge"].append(float(s["rougeL"].recall))
    return out


def rouge_l_recall(generations: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each generation against its reference."""
    return rouge_scores(generations, references)["rouge"]
