"""The TOFU evaluation suite: scoring and generation for each evaluation set, then the metrics of
:mod:`forgetful.tofu.metrics`, as open-unlearning's evaluation computes them (its code is the
reference: ``src/evals/metrics/``, ``configs/eval/tofu*.yaml``).

Every question/answer pair is encoded by :func:`~forgetful.data.tofu.encode_qa`, the encoder the
``tofu`` training task uses (chat template or plain text, the unscored prompt prefix, EOS), and
read with the attention mask ``token != pad`` and position ids ``0..L-1``. Per evaluation set
(``forget`` = ``<forget_split>_perturbed``, ``retain`` = ``retain_perturbed``, ``real_authors``,
``world_facts``; ``holdout`` = ``holdoutXX`` for the membership test) and example:

* ``answer_nll``: the mean NLL of the scored tokens (EOS included); probability ``exp(-answer_nll)``;
* ROUGE (``rouge-score``, Porter stemming) of the greedy generation (left padding, up to
  ``max_new_tokens``, stopped at the model's EOS) against the reference, which is the decoded full
  text minus the decoded prompt; both decoded without special tokens and with the tokenizer
  clean-up of transformers 4 (``" ."`` -> ``"."``, ...), as open-unlearning decodes them;
* truth ratio from the mean NLLs of the paraphrased (forget, retain) or true (real authors, world
  facts) answer and of the perturbed answers;
* forget and holdout: the Min-K% score; forget: the extraction strength.

Per-example values go to ``tofu_eval.json`` (so forget quality and privleak can be computed later
against any retain run, :mod:`.reference`), aggregates to ``tofu_summary.json``;
:func:`~forgetful.tofu.open_unlearning.to_open_unlearning` gives both in open-unlearning's
``TOFU_EVAL.json`` / ``TOFU_SUMMARY.json`` layout. The batched scorers and generation are
:mod:`.scoring`'s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.tofu import DEFAULT_MAX_LENGTH, TofuTemplate, encode_qa, load_tofu_split
from ..errors import ForgetfulError
from ..rouge import rouge_scores
from .metrics import (
    EVAL_SETS,
    bootstrap_model_utility,
    forget_quality,
    mia_auc,
    model_utility,
    normalised_probability,
    percentile_interval,
    privleak,
    probability,
    truth_ratio,
    truth_ratio_forget,
    truth_ratio_utility,
)
from .options import TofuDataOptions, TofuEvalOptions, copy_options
from .reference import RetainReference, load_retain_reference
from .scoring import answer_nll, generate_answers, references, score_answers

# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


def _set_split(name: str, forget_split: str) -> str:
    return {
        "forget": f"{forget_split}_perturbed",
        "retain": "retain_perturbed",
        "real_authors": "real_authors_perturbed",
        "world_facts": "world_facts_perturbed",
        "holdout": holdout_split(forget_split),
    }[name]


def holdout_split(forget_split: str) -> str:
    return "holdout" + forget_split.removeprefix("forget")


@dataclass(kw_only=True)
class TofuEvalConfig(TofuDataOptions, TofuEvalOptions):
    """What the TOFU suite evaluates on, and how (the options of ``forgetful eval-tofu``); the
    defaults are open-unlearning's."""

    seed: int = field(default=0, metadata={"help": "Seed of the embedded data."})

    def __post_init__(self):
        self.check_data_options()
        self.check_eval_options()

    @classmethod
    def for_run(cls, options, seed: int) -> TofuEvalConfig:
        """The evaluation of a training or unlearning run, from that run's options (the same option
        groups)."""
        return copy_options(cls, options, seed=seed)


def encoding_fingerprint(tokenizer, template: TofuTemplate, rows: Sequence[dict], max_length=DEFAULT_MAX_LENGTH):
    """A short hash of how the first forget examples encode: two evaluations are comparable only
    when their tokenizer and prompt template encode the same ids."""
    ids = [encode_qa(tokenizer, r["question"], r["paraphrased_answer"], max_length, template).ids for r in rows[:3]]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def evaluate_set(
    model,
    tokenizer,
    rows: list[dict],
    name: str,
    *,
    max_new_tokens: int,
    batch_size: int,
    template: TofuTemplate | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
) -> dict:
    """Per-example values of one evaluation set."""
    kw = {"template": template, "max_length": max_length}
    q = [r["question"] for r in rows]
    answers = [r["answer"] for r in rows]
    if name == "holdout":
        scores = score_answers(model, tokenizer, q, answers, batch_size=batch_size, **kw)
        return {"question": q, "answer": answers, "answer_nll": scores.nll.tolist(), "min_k": scores.min_k.tolist()}
    perturbed = [list(r["perturbed_answer"]) for r in rows]
    n_pert = {len(p) for p in perturbed}
    if len(n_pert) != 1 or 0 in n_pert:
        raise ForgetfulError(f"TOFU set '{name}': every row needs the same, non-zero number of perturbed answers")
    P = n_pert.pop()
    gens = generate_answers(model, tokenizer, q, max_new_tokens=max_new_tokens, batch_size=batch_size, **kw)
    refs, prompts = references(tokenizer, q, answers, with_prompts=True, **kw)
    rouge = rouge_scores(gens, refs)
    scores = score_answers(model, tokenizer, q, answers, batch_size=batch_size, **kw)
    ans_nll = scores.nll
    pert_nll = answer_nll(
        model, tokenizer, [x for x in q for _ in range(P)], [a for p in perturbed for a in p], batch_size, **kw
    ).reshape(len(rows), P)
    if name in ("forget", "retain"):
        para_nll = answer_nll(model, tokenizer, q, [r["paraphrased_answer"] for r in rows], batch_size, **kw)
        prob = probability(ans_nll)
        r_values = truth_ratio(para_nll, pert_nll)
    else:
        para_nll = ans_nll
        prob = normalised_probability(ans_nll, pert_nll)
        r_values = truth_ratio(ans_nll, pert_nll)
    out = {
        "question": q,
        "answer": answers,
        "prompt": prompts,
        "reference": refs,
        "generation": gens,
        **rouge,
        "prob": prob.tolist(),
        "truth_ratio": r_values.tolist(),
        "answer_nll": ans_nll.tolist(),
        "paraphrased_nll": para_nll.tolist(),
        "perturbed_nll": pert_nll.tolist(),
    }
    if name == "forget":
        out["min_k"] = scores.min_k.tolist()
        out["extraction_strength"] = scores.extraction.tolist()
    return out


def summarize(per_example: dict, reference: RetainReference | None = None) -> dict:
    """Aggregates of per-example results; forget quality and the privleak reference AUC come from
    the retain model's results (``reference``), privleak against 0.5 without it."""
    summary: dict = {}
    for name in EVAL_SETS:
        s = per_example[name]
        tr = truth_ratio_forget(s["truth_ratio"]) if name == "forget" else truth_ratio_utility(s["truth_ratio"])
        summary[name] = {
            "rouge": float(np.mean(s["rouge"])),
            "prob": float(np.mean(s["prob"])),
            "truth_ratio": tr,
            "examples": len(s["rouge"]),
        }
    summary["model_utility"] = model_utility(summary)
    # over the questions asked (the experiment compares runs with a paired one: tofu.experiment)
    samples = bootstrap_model_utility({"model": per_example})["model"]
    summary["model_utility_ci"] = list(percentile_interval(samples))
    summary["forget_quality"] = (
        forget_quality(per_example["forget"]["truth_ratio"], reference.forget_truth_ratio)
        if reference is not None
        else None
    )
    if "holdout" in per_example and "min_k" in per_example["forget"]:
        auc = mia_auc(per_example["forget"]["min_k"], per_example["holdout"]["min_k"])
        ref_auc = reference.mia_auc if reference is not None else None
        summary["mia_auc"] = auc
        summary["privleak_reference_auc"] = 0.5 if ref_auc is None else ref_auc
        summary["privleak"] = privleak(auc, ref_auc)
        summary["extraction_strength"] = float(np.mean(per_example["forget"]["extraction_strength"]))
    return summary


def summary_line(summary: dict) -> str:
    """The summary in one line, as the commands print it."""
    low, high = summary["model_utility_ci"]
    fq = summary["forget_quality"]
    parts = [
        f"model utility {summary['model_utility']:.4f} (95% over the questions: {low:.4f}-{high:.4f})",
        f"forget quality {'n/a (no --retain-eval)' if fq is None else f'{fq:.4g}'}",
    ]
    if summary.get("privleak") is not None:
        parts.append(f"privleak {summary['privleak']:.2f}")
    parts.append(f"forget ROUGE {summary['forget']['rouge']:.3f}")
    return "; ".join(parts)


def load_eval_sets(config: TofuEvalConfig) -> dict[str, list[dict]]:
    """The rows of every evaluation set (``max_examples`` each); a missing or malformed split
    fails with one line naming it."""
    kw = {"num_authors": config.num_authors, "seed": config.seed}
    sets = {}
    for name in (*EVAL_SETS, "holdout"):
        split = _set_split(name, config.forget_split)
        try:
            sets[name] = load_tofu_split(config.data_dir, split, **kw)
        except ForgetfulError as exc:
            if name == "forget":
                raise ForgetfulError(
                    f"{exc}; the evaluation of {config.forget_split} needs its perturbed answers "
                    f"({split}: paraphrased and perturbed answers for the truth ratio)"
                ) from None
            raise
    if config.max_eval_examples:
        sets = {k: v[: config.max_eval_examples] for k, v in sets.items()}
    return sets


def check_eval_splits(config: TofuEvalConfig) -> None:
    """Fail now, with one line, when a split the suite reads is missing or malformed (before a
    training run that would be evaluated on it)."""
    load_eval_sets(config)


def evaluate_tofu(
    model,
    tokenizer,
    config: TofuEvalConfig | None = None,
    *,
    retain_eval: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Run the suite; returns (per-example results with ``meta``, summary). With ``retain_eval``
    (the retain model's ``tofu_eval.json``) the summary has forget quality and privleak against
    the retain model's AUC."""
    from tqdm.auto import tqdm

    c = config or TofuEvalConfig()
    template = c.tofu_template()
    names = (*EVAL_SETS, "holdout")
    sets = load_eval_sets(c)
    kind = "chat" if template.is_chat(tokenizer) else "plain"
    fingerprint = encoding_fingerprint(tokenizer, template, sets["forget"], c.max_length)
    reference = None
    if retain_eval is not None:
        reference = load_retain_reference(
            retain_eval, c.forget_split, [r["question"] for r in sets["forget"]], fingerprint, kind
        )
    per_example: dict = {
        "meta": {
            "forget_split": c.forget_split,
            "holdout_split": holdout_split(c.forget_split),
            "source": str(c.data_dir or "embedded"),
            "max_new_tokens": c.max_new_tokens,
            "template": kind,
            "system_prompt": template.system_prompt if kind == "chat" else None,
            "date_string": template.date_string if kind == "chat" else None,
            "encoding": fingerprint,
        }
    }
    for name in tqdm(names, desc="eval-tofu", disable=not progress):
        per_example[name] = evaluate_set(
            model,
            tokenizer,
            sets[name],
            name,
            max_new_tokens=c.max_new_tokens,
            batch_size=c.eval_batch_size,
            template=template,
            max_length=c.max_length,
        )
    return per_example, summarize(per_example, reference)
