"""The TOFU evaluation suite: scoring and generation for each evaluation set, then the metrics of
:mod:`forgetful.tofu.metrics`, as the reference implementation defines them.

Per evaluation set (``forget`` = ``<forget_split>_perturbed``, ``retain`` = ``retain_perturbed``,
``real_authors``, ``world_facts``) and example:

* ROUGE-L recall (``rouge-score``, Porter stemming) of the greedy generation (up to
  ``max_new_tokens``) against the answer;
* probability ``p = exp(-NLL / answer_tokens)`` of the answer given the question; on real authors
  and world facts the normalised ``p_true / (p_true + sum p_perturbed)``;
* truth ratio ``R = geomean(p_perturbed) / p_correct`` with length-normalised probabilities, the
  correct answer being the paraphrased answer (forget, retain) or the answer (real authors, world
  facts).

Aggregates: forget truth ratio = mean ``min(R, 1/R)``, other sets mean ``max(0, 1 - R)``; forget
quality = KS-test p-value between the per-example forget ``R`` of the model and of the retain
model; model utility = harmonic mean of {probability, ROUGE, truth ratio} x {retain, real authors,
world facts}. Per-example values go to ``tofu_eval.json`` (so forget quality can be computed later
against any retain run), aggregates to ``tofu_summary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.tofu import FORGET_SPLITS, encode_qa, encode_question, load_tofu_split
from ..errors import ForgetfulError
from ..loss_kernels import check_loss_backend
from ..nll import IGNORE_INDEX, token_nll
from ..tokens import pad_sequences, pad_token_id
from .metrics import (
    EVAL_SETS,
    forget_quality,
    model_utility,
    normalised_probability,
    probability,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_forget,
    truth_ratio_utility,
)

# --------------------------------------------------------------------------------------------
# Batched scoring and generation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    max_length: int = 512,
    loss_backend: str = "dense",
) -> np.ndarray:
    """Average per-token NLL of each answer (+ EOS) given ``Question: q\\nAnswer:``, batched and
    sorted by length (:func:`~forgetful.data.tofu.encode_qa`, the encoding training uses).
    ``loss_backend``: how the answer logits and NLL are computed (:mod:`forgetful.loss_kernels`)."""
    device = next(model.parameters()).device
    encoded = [encode_qa(tokenizer, q, a, max_length) for q, a in zip(questions, answers)]
    seqs = [e.ids for e in encoded]
    starts = [e.prompt_length for e in encoded]
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = np.zeros(len(seqs))
    was_training = model.training
    model.eval()
    pad = pad_token_id(tokenizer, model)
    for i in range(0, len(seqs), batch_size):
        idx = order[i : i + batch_size]
        ids, real = pad_sequences([seqs[j] for j in idx], pad)
        starts_t = torch.tensor([starts[j] for j in idx])
        labels = ids.masked_fill(~real, IGNORE_INDEX)
        labels = labels.masked_fill(torch.arange(ids.shape[1])[None] < starts_t[:, None], IGNORE_INDEX)
        res = token_nll(
            model, ids.to(device), labels.to(device), attention_mask=real.long().to(device), loss_backend=loss_backend
        )
        avg = (res.sum_per_row() / res.count_per_row().clamp(min=1)).float().cpu().numpy()
        out[idx] = avg
    model.train(was_training)
    return out


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int = 200,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers, batched with left padding, stopped at EOS; the prompt is not returned."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer, model)
    prompts = [encode_question(tokenizer, q) for q in questions]
    order = np.argsort([len(p) for p in prompts], kind="stable")
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for i in range(0, len(prompts), batch_size):
        idx = order[i : i + batch_size]
        # left padding, so every prompt ends where generation starts: right-pad the reversed prompts
        ids, real = pad_sequences([prompts[j][::-1] for j in idx], pad)
        ids, attn = ids.flip(1), real.flip(1).long()
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        for r, j in enumerate(idx):
            out[j] = texts[r].strip()
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


def _set_split(name: str, forget_split: str) -> str:
    return {
        "forget": f"{forget_split}_perturbed",
        "retain": "retain_perturbed",
        "real_authors": "real_authors_perturbed",
        "world_facts": "world_facts_perturbed",
    }[name]


def evaluate_set(
    model, tokenizer, rows: list[dict], name: str, *, max_new_tokens: int, batch_size: int, loss_backend: str = "dense"
) -> dict:
    """Per-example metrics of one evaluation set."""
    q = [r["question"] for r in rows]
    answers = [r["answer"] for r in rows]
    perturbed = [list(r["perturbed_answer"]) for r in rows]
    n_pert = {len(p) for p in perturbed}
    if len(n_pert) != 1 or 0 in n_pert:
        raise ForgetfulError(f"TOFU set '{name}': every row needs the same, non-zero number of perturbed answers")
    P = n_pert.pop()
    gens = generate_answers(model, tokenizer, q, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rouge = rouge_l_recall(gens, answers)
    kw = {"loss_backend": loss_backend}
    ans_nll = answer_nll(model, tokenizer, q, answers, batch_size, **kw)
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
    return {
        "question": q,
        "answer": answers,
        "generation": gens,
        "rouge": rouge,
        "prob": prob.tolist(),
        "truth_ratio": r_values.tolist(),
        "answer_nll": ans_nll.tolist(),
        "paraphrased_nll": para_nll.tolist(),
        "perturbed_nll": pert_nll.tolist(),
    }


def summarize(per_example: dict, retain_forget_r: Sequence[float] | None) -> dict:
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
        forget_quality(per_example["forget"]["truth_ratio"], retain_forget_r) if retain_forget_r is not None else None
    )
    return summary


def load_retain_reference(path: str | Path, forget_split: str, forget_questions: Sequence[str]) -> list[float]:
    """The retain model's per-example forget truth ratios, checked to match this evaluation."""
    p = Path(path)
    if not p.is_file():
        raise ForgetfulError(f"retain results not found: {p} (give the retain model's tofu_eval.json)")
    try:
        ref = json.loads(p.read_text())
        ref_split = ref["meta"]["forget_split"]
        ref_r = ref["forget"]["truth_ratio"]
        ref_q = ref["forget"]["question"]
    except (json.JSONDecodeError, KeyError, TypeError):
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
    return [float(x) for x in ref_r]


@dataclass
class TofuEvalConfig:
    """What the TOFU suite evaluates on, and how (the options of ``forgetful eval-tofu``)."""

    data_dir: str | None = field(
        default=None, metadata={"help": "TOFU folder of <split>.json, 'locuslab/TOFU', or unset for the embedded data."}
    )
    forget_split: str = field(default="forget10", metadata={"help": "forget01, forget05 or forget10."})
    max_new_tokens: int = field(default=200, metadata={"help": "Longest greedy answer generated (for ROUGE)."})
    batch_size: int = field(default=32, metadata={"help": "Evaluation batch size."})
    max_examples: int | None = field(default=None, metadata={"help": "Evaluate at most this many examples per set."})
    num_authors: int = field(default=200, metadata={"help": "Authors in the embedded data."})
    seed: int = field(default=0, metadata={"help": "Seed of the embedded data."})
    loss_backend: Literal["auto", "dense", "chunked", "cce", "liger"] = field(
        default="dense",
        metadata={"help": "How answer NLLs are computed: dense, chunked, cce, liger or auto (see loss_kernels)."},
    )

    def __post_init__(self):
        check_loss_backend(self.loss_backend)
        if self.forget_split not in FORGET_SPLITS:
            raise ForgetfulError(f"forget split must be one of {', '.join(FORGET_SPLITS)}, got '{self.forget_split}'")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ForgetfulError("max_new_tokens and batch_size must be positive")


def evaluate_tofu(
    model,
    tokenizer,
    config: TofuEvalConfig | None = None,
    *,
    retain_eval: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Run the suite; returns (per-example results with ``meta``, summary). With ``retain_eval``
    (the retain model's ``tofu_eval.json``) the summary has forget quality."""
    from tqdm.auto import tqdm

    c = config or TofuEvalConfig()
    kw = {"num_authors": c.num_authors, "seed": c.seed}
    sets = {name: load_tofu_split(c.data_dir, _set_split(name, c.forget_split), **kw) for name in EVAL_SETS}
    if c.max_examples:
        sets = {k: v[: c.max_examples] for k, v in sets.items()}
    retain_r = None
    if retain_eval is not None:
        retain_r = load_retain_reference(retain_eval, c.forget_split, [r["question"] for r in sets["forget"]])
    per_example: dict = {
        "meta": {
            "forget_split": c.forget_split,
            "source": str(c.data_dir or "embedded"),
            "max_new_tokens": c.max_new_tokens,
        }
    }
    for name in tqdm(EVAL_SETS, desc="eval-tofu", disable=not progress):
        per_example[name] = evaluate_set(
            model,
            tokenizer,
            sets[name],
            name,
            max_new_tokens=c.max_new_tokens,
            batch_size=c.batch_size,
            loss_backend=c.loss_backend,
        )
    return per_example, summarize(per_example, retain_r)
