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
against any retain run), aggregates to ``tofu_summary.json``; :func:`to_open_unlearning` gives
both in open-unlearning's ``TOFU_EVAL.json`` / ``TOFU_SUMMARY.json`` layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.tofu import (
    DEFAULT_DATE_STRING,
    DEFAULT_MAX_LENGTH,
    DEFAULT_SYSTEM_PROMPT,
    FORGET_SPLITS,
    TEMPLATE_KINDS,
    TofuTemplate,
    encode_qa,
    encode_question,
    load_tofu_split,
)
from ..errors import ForgetfulError
from ..nll import IGNORE_INDEX, lm_head_on, prediction_positions
from ..rouge import rouge_scores
from ..tokens import pad_sequences, pad_token_id
from .metrics import (
    EVAL_SETS,
    MIN_K,
    extraction_strength,
    forget_quality,
    mia_auc,
    min_k_score,
    model_utility,
    normalised_probability,
    privleak,
    probability,
    truth_ratio,
    truth_ratio_forget,
    truth_ratio_utility,
)

# --------------------------------------------------------------------------------------------
# Batched scoring and generation
# --------------------------------------------------------------------------------------------


@dataclass
class AnswerScores:
    """Per example: mean NLL of the scored tokens, Min-K% score and extraction strength (both
    over the scored tokens but the last)."""

    nll: np.ndarray
    min_k: np.ndarray
    extraction: np.ndarray


@torch.no_grad()
def score_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    template: TofuTemplate | None = None,
    batch_size: int = 32,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    k: float = MIN_K,
) -> AnswerScores:
    """Score every answer given its question in one forward pass per batch (right padding, in
    input order): the vocabulary logits are computed only at the positions that predict a scored
    token."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer, model)
    encoded = [encode_qa(tokenizer, q, a, max_length, template) for q, a in zip(questions, answers)]
    n = len(encoded)
    nll, mink, es = np.zeros(n), np.zeros(n), np.zeros(n)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, n, batch_size):
            batch = encoded[i : i + batch_size]
            ids, real = pad_sequences([e.ids for e in batch], pad)
            attn, _ = pad_sequences([e.attention_mask for e in batch], 0)
            starts = torch.tensor([e.prompt_length for e in batch])
            labels = ids.masked_fill(~real, IGNORE_INDEX)
            labels = labels.masked_fill(torch.arange(ids.shape[1])[None] < starts[:, None], IGNORE_INDEX)
            ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
            positions = prediction_positions(labels)
            with lm_head_on(model, positions):
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
            targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
            token_lp = logp.gather(1, targets[:, None])[:, 0].cpu().numpy()
            preds = logp.argmax(-1).cpu().numpy()
            targets = targets.cpu().numpy()
            rows = positions.nonzero()[:, 0].cpu().numpy()
            for r in range(len(batch)):
                sel = rows == r
                lp, pr, tg = token_lp[sel], preds[sel], targets[sel]
                nll[i + r] = -lp.astype(np.float64).sum() / len(lp) if len(lp) else float("nan")
                mink[i + r] = min_k_score(lp[:-1], k)
                es[i + r] = extraction_strength(pr[:-1], tg[:-1])
    finally:
        model.train(was_training)
    return AnswerScores(nll, mink, es)


def answer_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    template: TofuTemplate | None = None,
) -> np.ndarray:
    """Mean NLL of the scored tokens of each answer (:func:`~forgetful.data.tofu.encode_qa`)."""
    return score_answers(
        model, tokenizer, questions, answers, template=template, batch_size=batch_size, max_length=max_length
    ).nll


def clean_up_tokenization(text: str) -> str:
    """transformers 4's ``clean_up_tokenization_spaces`` (transformers 5 no longer applies it to
    BPE tokenizers; open-unlearning decodes with it)."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def decode(tokenizer, ids) -> str:
    """Text of ``ids`` without special tokens, cleaned up as open-unlearning decodes."""
    return clean_up_tokenization(tokenizer.decode(list(ids), skip_special_tokens=True))


def _eos_for_generation(model, tokenizer):
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return eos if eos is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int = 200,
    batch_size: int = 32,
    *,
    template: TofuTemplate | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
) -> list[str]:
    """Greedy answers to the prompts of :func:`~forgetful.data.tofu.encode_question`, batched in
    input order with left padding and the attention mask ``token != pad`` (generation positions
    count only attended tokens), stopped at the model's EOS; decoded without special tokens,
    cleaned up, cut at the EOS text and stripped."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer, model)
    prompts = [encode_question(tokenizer, q, max_length, template) for q in questions]
    eos_text = tokenizer.decode([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else ""
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            # left padding, so every prompt ends where generation starts: right-pad the reversed prompts
            ids, _ = pad_sequences([p[::-1] for p in batch], pad)
            ids = ids.flip(1)
            width = ids.shape[1]
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=ids.ne(pad).long().to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                top_p=None,
                temperature=None,
                use_cache=True,
                pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad,
                eos_token_id=_eos_for_generation(model, tokenizer),
            )
            for row in gen[:, width:].cpu().tolist():
                text = decode(tokenizer, row)
                if eos_text and eos_text in text:
                    text = text.split(eos_text)[0]
                out.append(text.strip())
    finally:
        model.train(was_training)
    return out


def references(
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    template: TofuTemplate | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    with_prompts: bool = False,
):
    """The ROUGE reference of each answer: the decoded full sequence with the decoded prompt
    removed (every occurrence), stripped; with ``with_prompts``, also the decoded prompts."""
    refs, prompts = [], []
    for q, a in zip(questions, answers):
        full = decode(tokenizer, encode_qa(tokenizer, q, a, max_length, template).ids)
        prompt = decode(tokenizer, encode_question(tokenizer, q, max_length, template))
        refs.append(full.replace(prompt, "").strip())
        prompts.append(prompt)
    return (refs, prompts) if with_prompts else refs


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


@dataclass
class TofuEvalConfig:
    """What the TOFU suite evaluates on, and how (the options of ``forgetful eval-tofu``); the
    defaults are open-unlearning's."""

    data_dir: str | None = field(
        default=None, metadata={"help": "TOFU folder of <split>.json, 'locuslab/TOFU', or unset for the embedded data."}
    )
    forget_split: str = field(default="forget10", metadata={"help": "forget01, forget05 or forget10."})
    max_new_tokens: int = field(default=200, metadata={"help": "Longest greedy answer generated (for ROUGE)."})
    batch_size: int = field(default=32, metadata={"help": "Evaluation batch size (scoring and generation)."})
    max_examples: int | None = field(default=None, metadata={"help": "Evaluate at most this many examples per set."})
    num_authors: int = field(default=200, metadata={"help": "Authors in the embedded data."})
    seed: int = field(default=0, metadata={"help": "Seed of the embedded data."})
    template: str = field(
        default="auto",
        metadata={"help": "Prompt format: chat (the tokenizer's chat template), plain (Question/Answer), auto."},
    )
    system_prompt: str | None = field(
        default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "Chat template: the system prompt ('' for none)."}
    )
    date_string: str | None = field(
        default=DEFAULT_DATE_STRING, metadata={"help": "Chat template: the date_string variable ('' for none)."}
    )
    max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "Plain template: truncate to this length."})

    def __post_init__(self):
        if self.forget_split not in FORGET_SPLITS:
            raise ForgetfulError(f"forget split must be one of {', '.join(FORGET_SPLITS)}, got '{self.forget_split}'")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ForgetfulError("max_new_tokens and batch_size must be positive")
        if self.template not in TEMPLATE_KINDS:
            raise ForgetfulError(f"template must be one of {', '.join(TEMPLATE_KINDS)}, got '{self.template}'")

    def tofu_template(self) -> TofuTemplate:
        return TofuTemplate(kind=self.template, system_prompt=self.system_prompt, date_string=self.date_string)

    @classmethod
    def for_run(cls, options, seed: int) -> TofuEvalConfig:
        """The evaluation of a training or unlearning run, from that run's options (the unlearn and
        tofu-experiment configs name these fields alike; ``eval_batch_size`` and
        ``max_eval_examples`` are theirs for ``batch_size`` and ``max_examples``)."""
        return cls(
            data_dir=options.data_dir,
            forget_split=options.forget_split,
            max_new_tokens=options.max_new_tokens,
            batch_size=options.eval_batch_size,
            max_examples=options.max_eval_examples,
            num_authors=options.num_authors,
            seed=seed,
            template=options.template,
            system_prompt=options.system_prompt,
            date_string=options.date_string,
            max_length=options.max_length,
        )


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
    if config.max_examples:
        sets = {k: v[: config.max_examples] for k, v in sets.items()}
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
            batch_size=c.batch_size,
            template=template,
            max_length=c.max_length,
        )
    return per_example, summarize(per_example, reference)


def reference_from_results(per_example: dict) -> RetainReference:
    """A retain model's reference from its per-example results in memory."""
    auc = None
    if "holdout" in per_example and "min_k" in per_example["forget"]:
        auc = mia_auc(per_example["forget"]["min_k"], per_example["holdout"]["min_k"])
    return RetainReference([float(x) for x in per_example["forget"]["truth_ratio"]], auc)


# --------------------------------------------------------------------------------------------
# open-unlearning's file layout
# --------------------------------------------------------------------------------------------

_OU_SETS = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}


def _by_index(values, key: str) -> dict:
    return {str(i): {key: v} for i, v in enumerate(values)}


def to_open_unlearning(per_example: dict, summary: dict) -> tuple[dict, dict]:
    """(``TOFU_EVAL.json``, ``TOFU_SUMMARY.json``) in open-unlearning's layout: per metric an
    ``agg_value`` and ``value_by_index`` keyed by the row number as a string."""
    ev: dict = {}
    for name, pre in _OU_SETS.items():
        s, agg = per_example[name], summary[name]
        n = len(s["question"])
        ev[f"{pre}_Q_A_Prob"] = {
            "agg_value": float(np.mean(probability(s["answer_nll"]))),
            "value_by_index": {
                str(i): {"prob": float(np.exp(-s["answer_nll"][i])), "avg_loss": s["answer_nll"][i]} for i in range(n)
            },
        }
        pert = np.asarray(s["perturbed_nll"], dtype=np.float64)
        ev[f"{pre}_Q_A_PERT_Prob"] = {
            "agg_value": float(np.mean(np.exp(-pert))),
            "value_by_index": {
                str(i): {"prob": np.exp(-pert[i]).tolist(), "avg_loss": pert[i].tolist()} for i in range(n)
            },
        }
        ev[f"{pre}_Q_A_ROUGE"] = {
            "agg_value": agg["rouge"],
            "value_by_index": {
                str(i): {
                    "rouge1_recall": s["rouge1_recall"][i],
                    "rougeL_f1": s["rougeL_f1"][i],
                    "rougeL_recall": s["rouge"][i],
                    "input": s["prompt"][i],
                    "ground_truth": s["reference"][i],
                    "generation": s["generation"][i],
                }
                for i in range(n)
            },
        }
        tr_name = "forget_truth_ratio" if name == "forget" else f"{pre}_Truth_Ratio"
        ev[tr_name] = {"agg_value": agg["truth_ratio"], "value_by_index": _by_index(s["truth_ratio"], "score")}
        if name in ("forget", "retain"):
            para = s["paraphrased_nll"]
            ev[f"{pre}_Q_A_PARA_Prob"] = {
                "agg_value": float(np.mean(probability(para))),
                "value_by_index": {str(i): {"prob": float(np.exp(-para[i])), "avg_loss": para[i]} for i in range(n)},
            }
        else:
            ev[f"{pre}_Q_A_Prob_normalised"] = {
                "agg_value": agg["prob"],
                "value_by_index": _by_index(s["prob"], "prob"),
            }
    if "privleak" in summary:
        f, h = per_example["forget"], per_example["holdout"]
        ev["mia_min_k"] = {
            "forget": {"agg_value": float(np.mean(f["min_k"])), "value_by_index": _by_index(f["min_k"], "score")},
            "holdout": {"agg_value": float(np.mean(h["min_k"])), "value_by_index": _by_index(h["min_k"], "score")},
            "auc": summary["mia_auc"],
            "agg_value": summary["mia_auc"],
        }
        ev["privleak"] = {"agg_value": summary["privleak"]}
        ev["extraction_strength"] = {
            "agg_value": summary["extraction_strength"],
            "value_by_index": _by_index(f["extraction_strength"], "score"),
        }
    ev["forget_quality"] = {"agg_value": summary["forget_quality"]}
    ev["model_utility"] = {"agg_value": summary["model_utility"]}
    ev = dict(sorted(ev.items()))
    names = ("extraction_strength", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_quality")
    names += ("forget_truth_ratio", "model_utility", "privleak")
    short = {k: ev[k]["agg_value"] for k in names if k in ev and ev[k]["agg_value"] is not None}
    return ev, short
