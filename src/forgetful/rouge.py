"""ROUGE-L recall of generated answers against references (``rouge-score``, Porter stemming): the
answer-quality measure of the TOFU benchmark and of question answering over compressed context."""

from __future__ import annotations

import functools
from collections.abc import Sequence


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(generations: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each generation against its reference."""
    return [_scorer().score(ref, gen)["rougeL"].recall for gen, ref in zip(generations, references)]
