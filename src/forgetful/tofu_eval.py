"""The TOFU evaluation suite, as the reference implementation defines it.

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
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .errors import ForgetfulError
from .tofu import FORGET_SPLITS, load_tofu_split, prompt_for

EPS = 1e-10  # as in open-unlearning
EVAL_SETS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SETS = ("retain", "real_authors", "world_facts")


# --------------------------------------------------------------------------------------------
# Metric definitions (pure functions, tested against hand computations)
# --------------------------------------------------------------------------------------------


def rouge_l_recall(generations: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each generation against its reference (Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, gen)["rougeL"].recall for gen, ref in zip(generations, references)]


def probability(avg_nll: np.ndarray) -> np.ndarray:
    """Length-normalised probability ``exp(-NLL / tokens)`` from the per-token average NLL."""
    return np.exp(-np.asarray(avg_nll, dtype=np.float64))


def normalised_probability(true_avg_nll: np.ndarray, perturbed_avg_nll: np.ndarray) -> np.ndarray:
    """``p_true / (p_true + sum_j p_perturbed_j)`` per example (perturbed: ``[N, P]``)."""
    p_true = probability(true_avg_nll)
    p_pert = probability(perturbed_avg_nll).sum(-1)
    return p_true / (p_true + p_pert + EPS)


def truth_ratio(correct_avg_nll: np.ndarray, perturbed_avg_nll: np.ndarray) -> np.ndarray:
    """Per-example ``R = geomean_j p_perturbed_j / p_correct`` with length-normalised
    probabilities, i.e. ``exp(nll_correct - mean_j nll_perturbed_j)``."""
    p_wrong = np.exp(-np.asarray(perturbed_avg_nll, dtype=np.float64).mean(-1))
    p_correct = probability(correct_avg_nll)
    return p_wrong / (p_correct + EPS)


def truth_ratio_forget(r: np.ndarray) -> float:
    """Forget set: mean of ``min(R, 1/R)`` (1 = the model cannot tell true from false)."""
    r = np.asarray(r, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1.0 / (r + EPS))))


def truth_ratio_utility(r: np.ndarray) -> float:
    """Other sets: mean of ``max(0, 1 - R)`` (1 = the true answer is far more likely)."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(r, dtype=np.float64))))


def forget_quality(model_forget_r: Sequence[float], retain_forget_r: Sequence[float]) -> float:
    """KS-test p-value between the per-example forget truth ratios of a model and of the
    retain model (1 = indistinguishable from never having seen the forget set)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(model_forget_r), np.asarray(retain_forget_r)).pvalue)


def model_utility(summary: dict) -> float:
    """Harmonic mean of probability, ROUGE and truth ratio on retain, real authors, world facts."""
    from scipy.stats import hmean

    values = [summary[s][m] for s in UTILITY_SETS for m in ("prob", "rouge", "truth_ratio")]
    if min(values) <= 0:
        return 0.0
    return float(hmean(values))


# --------------------------------------------------------------------------------------------
# Batched scoring and generation
# --------------------------------------------------------------------------------------------


def _encode_prompt(tokenizer, question: str) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt_for(question), add_special_tokens=False)["input_ids"]


def _encode_answer(tokenizer, answer: str) -> list[int]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + eos


@torch.no_grad()
def answer_nll(model: nn.Module, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str],
               answers: Sequence[str], batch_size: int = 32, max_length: int = 512) -> np.ndarray:
    """Average per-token NLL of each answer (+ EOS) given ``Question: q\\nAnswer:``, batched and
    sorted by length (the tokenization matches training)."""
    from .data import pad_sequences
    from .token_loss import IGNORE_INDEX, token_nll

    device = next(model.parameters()).device
    seqs, starts = [], []
    for q, a in zip(questions, answers):
        p, ans = _encode_prompt(tokenizer, q), _encode_answer(tokenizer, a)
        ids = (p + ans)[-max_length:]
        seqs.append(ids)
        starts.append(max(1, len(ids) - len(ans)))
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = np.zeros(len(seqs))
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in range(0, len(seqs), batch_size):
        idx = order[i:i + batch_size]
        ids, real = pad_sequences([seqs[j] for j in idx], pad)
        starts_t = torch.tensor([starts[j] for j in idx])
        labels = ids.masked_fill(~real, IGNORE_INDEX)
        labels = labels.masked_fill(torch.arange(ids.shape[1])[None] < starts_t[:, None], IGNORE_INDEX)
        res = token_nll(model, ids.to(device), labels.to(device), attention_mask=real.long().to(device))
        avg = (res.sum_per_row() / res.count_per_row().clamp(min=1)).float().cpu().numpy()
        out[idx] = avg
    model.train(was_training)
    return out


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str],
                     max_new_tokens: int = 200, batch_size: int = 32) -> list[str]:
    """Greedy answers, batched with left padding, stopped at EOS; the prompt is not returned."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [_encode_prompt(tokenizer, q) for q in questions]
    order = np.argsort([len(p) for p in prompts], kind="stable")
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for i in range(0, len(prompts), batch_size):
        idx = order[i:i + batch_size]
        batch = [prompts[j] for j in idx]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, p in enumerate(batch):  # left padding: prompts end where generation starts
            ids[r, width - len(p):] = torch.tensor(p)
            attn[r, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        for r, j in enumerate(idx):
            out[j] = texts[r].strip()
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


def _set_split(name: str, forget_split: str) -> str:
    return {"forget": f"{forget_split}_perturbed", "retain": "retain_perturbed",
            "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}[name]


def evaluate_set(model, tokenizer, rows: list[dict], name: str, *, max_new_tokens: int, batch_size: int) -> dict:
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
    ans_nll = answer_nll(model, tokenizer, q, answers, batch_size)
    pert_nll = answer_nll(model, tokenizer, [x for x in q for _ in range(P)], [a for p in perturbed for a in p],
                          batch_size).reshape(len(rows), P)
    if name in ("forget", "retain"):
        para_nll = answer_nll(model, tokenizer, q, [r["paraphrased_answer"] for r in rows], batch_size)
        prob = probability(ans_nll)
        r_values = truth_ratio(para_nll, pert_nll)
    else:
        para_nll = ans_nll
        prob = normalised_probability(ans_nll, pert_nll)
        r_values = truth_ratio(ans_nll, pert_nll)
    return {
        "question": q, "answer": answers, "generation": gens, "rouge": rouge, "prob": prob.tolist(),
        "truth_ratio": r_values.tolist(), "answer_nll": ans_nll.tolist(), "paraphrased_nll": para_nll.tolist(),
        "perturbed_nll": pert_nll.tolist(),
    }


def summarize(per_example: dict, retain_forget_r: Sequence[float] | None) -> dict:
    summary: dict = {}
    for name in EVAL_SETS:
        s = per_example[name]
        tr = truth_ratio_forget(s["truth_ratio"]) if name == "forget" else truth_ratio_utility(s["truth_ratio"])
        summary[name] = {"rouge": float(np.mean(s["rouge"])), "prob": float(np.mean(s["prob"])), "truth_ratio": tr,
                         "examples": len(s["rouge"])}
    summary["model_utility"] = model_utility(summary)
    summary["forget_quality"] = (forget_quality(per_example["forget"]["truth_ratio"], retain_forget_r)
                                 if retain_forget_r is not None else None)
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
        raise ForgetfulError(f"the retain results in {p} are for {ref_split}, but this evaluation is for {forget_split}")
    if len(ref_r) != len(forget_questions):
        raise ForgetfulError(
            f"row counts do not match: the retain results have {len(ref_r)} forget examples, this evaluation "
            f"has {len(forget_questions)}"
        )
    if list(ref_q) != list(forget_questions):
        raise ForgetfulError(f"the retain results in {p} were computed on other forget questions")
    return [float(x) for x in ref_r]


def evaluate_tofu(model, tokenizer, *, source=None, forget_split: str = "forget10", max_new_tokens: int = 200,
                  batch_size: int = 32, max_examples: int | None = None, num_authors: int = 200, seed: int = 0,
                  retain_eval: str | Path | None = None, progress: bool = True) -> tuple[dict, dict]:
    """Run the suite; returns (per-example results with ``meta``, summary)."""
    from tqdm.auto import tqdm

    if forget_split not in FORGET_SPLITS:
        raise ForgetfulError(f"forget split must be one of {', '.join(FORGET_SPLITS)}, got '{forget_split}'")
    kw = {"num_authors": num_authors, "seed": seed}
    sets = {name: load_tofu_split(source, _set_split(name, forget_split), **kw) for name in EVAL_SETS}
    if max_examples:
        sets = {k: v[:max_examples] for k, v in sets.items()}
    retain_r = None
    if retain_eval is not None:
        retain_r = load_retain_reference(retain_eval, forget_split, [r["question"] for r in sets["forget"]])
    per_example: dict = {"meta": {"forget_split": forget_split, "source": str(source or "embedded"),
                                  "max_new_tokens": max_new_tokens}}
    for name in tqdm(EVAL_SETS, desc="eval-tofu", disable=not progress):
        per_example[name] = evaluate_set(model, tokenizer, sets[name], name, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size)
    return per_example, summarize(per_example, retain_r)


@dataclass
class EvalTofuArguments:
    model: str = field(metadata={"help": "Model folder (save_pretrained) or Hub name."})
    out: str = field(metadata={"help": "Output folder for tofu_eval.json and tofu_summary.json."})
    data_dir: str | None = field(default=None, metadata={"help": "TOFU folder of <split>.json, 'locuslab/TOFU', or unset for the embedded data."})
    forget_split: str = field(default="forget10", metadata={"help": "forget01, forget05 or forget10."})
    retain_eval: str | None = field(default=None, metadata={"help": "The retain model's tofu_eval.json, for forget quality."})
    max_new_tokens: int = field(default=200)
    batch_size: int = field(default=32)
    max_examples: int | None = field(default=None, metadata={"help": "Evaluate at most this many examples per set."})
    num_authors: int = field(default=200, metadata={"help": "Authors in the embedded data."})
    seed: int = field(default=0)


def run_eval_tofu(a: EvalTofuArguments) -> dict:
    from .modeling import load_model
    from .reporting import write_json

    if a.max_new_tokens < 1 or a.batch_size < 1:
        raise ForgetfulError("max_new_tokens and batch_size must be positive")
    model, tokenizer = load_model(a.model)
    if torch.cuda.is_available():
        model = model.to("cuda")
    per_example, summary = evaluate_tofu(
        model, tokenizer, source=a.data_dir, forget_split=a.forget_split, max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size, max_examples=a.max_examples, num_authors=a.num_authors, seed=a.seed,
        retain_eval=a.retain_eval,
    )
    out = Path(a.out)
    per_example["meta"]["model"] = a.model
    write_json(per_example, out / "tofu_eval.json")
    write_json(summary, out / "tofu_summary.json")
    fq = summary["forget_quality"]
    print(f"model utility {summary['model_utility']:.4f}; forget quality "
          f"{'n/a (no --retain-eval)' if fq is None else f'{fq:.4g}'}; forget ROUGE {summary['forget']['rouge']:.3f}")
    return summary


def is_finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
