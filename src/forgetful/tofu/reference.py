"""The retain model's side of forget quality and privleak: its per-example forget truth ratios
and its Min-K% AUC, read from its evaluation file (ours, or open-unlearning's ``TOFU_EVAL.json``)
or from results in memory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ForgetfulError
from .metrics import mia_auc


@dataclass(frozen=True)
class RetainReference:
    """What a retain model's evaluation contributes: its raw per-example forget truth ratios
    (forget quality) and its Min-K% AUC (privleak; None when its results have none)."""

    forget_truth_ratio: list[float]
    mia_auc: float | None


def load_retain_reference(
    path: str | Path,
    forget_split: str,
    forget_questions: Sequence[str],
    fingerprint: str | None = None,
    template: str | None = None,
) -> RetainReference:
    """The retain model's per-example results, checked to match this evaluation: forgetful's
    ``tofu_eval.json``, or open-unlearning's ``TOFU_EVAL.json`` (only the row count can be
    checked then)."""
    p = Path(path)
    if not p.is_file():
        raise ForgetfulError(f"retain results not found: {p} (give the retain model's tofu_eval.json)")
    try:
        ref = json.loads(p.read_text())
    except json.JSONDecodeError:
        raise ForgetfulError(f"{p} is not a tofu_eval.json written by forgetful eval-tofu") from None
    if isinstance(ref, dict) and "forget_truth_ratio" in ref and "meta" not in ref:
        return _open_unlearning_reference(p, ref, len(forget_questions))
    try:
        ref_split = ref["meta"]["forget_split"]
        ref_r = ref["forget"]["truth_ratio"]
        ref_q = ref["forget"]["question"]
    except (KeyError, TypeError):
        raise ForgetfulError(f"{p} is not a tofu_eval.json written by forgetful eval-tofu") from None
    if ref_split != forget_split:
        raise ForgetfulError(
            f"the retain results in {p} are for {ref_split}, but this evaluation is for {forget_split}"
        )
    if len(ref_r) != len(forget_questions):
        raise ForgetfulError(
            f"row counts do not match: the retain results have {len(ref_r)} forget examples, this evaluation "
            f"has {len(forget_questions)}"
        )
    if list(ref_q) != list(forget_questions):
        raise ForgetfulError(f"the retain results in {p} were computed on other forget questions")
    ref_fp = ref["meta"].get("encoding")
    if fingerprint is not None and ref_fp is not None and ref_fp != fingerprint:
        theirs = ref["meta"].get("template", "?")
        raise ForgetfulError(
            f"the retain results in {p} were computed with another tokenizer or prompt template "
            f"(template {theirs}, this evaluation {template or '?'}): their truth ratios are not comparable"
        )
    auc = None
    if "holdout" in ref and "min_k" in ref["forget"]:
        auc = mia_auc(ref["forget"]["min_k"], ref["holdout"]["min_k"])
    return RetainReference([float(x) for x in ref_r], auc)


def _open_unlearning_reference(p: Path, ref: dict, n: int) -> RetainReference:
    try:
        by_index = ref["forget_truth_ratio"]["value_by_index"]
        r = [float(by_index[k]["score"]) for k in sorted(by_index, key=int)]
        auc = ref.get("mia_min_k", {}).get("agg_value")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ForgetfulError(f"{p} is not a tofu_eval.json written by forgetful eval-tofu") from None
    if len(r) != n:
        raise ForgetfulError(
            f"row counts do not match: the retain results have {len(r)} forget examples, this evaluation has {n}"
        )
    return RetainReference(r, None if auc is None else float(auc))


def reference_from_results(per_example: dict) -> RetainReference:
    """A retain model's reference from its per-example results in memory."""
    auc = None
    if "holdout" in per_example and "min_k" in per_example["forget"]:
        auc = mia_auc(per_example["forget"]["min_k"], per_example["holdout"]["min_k"])
    return RetainReference([float(x) for x in per_example["forget"]["truth_ratio"]], auc)
