"""The surprise scores of the TOFU experiment: the NLL of every forget-answer token under the
model *before finetuning* (the experiment's initialisation), which the ``surprise`` masking
strategy reads (:func:`~forgetful.loss.share_masks.surprise_masks`). Written once per experiment
folder (``surprise_scores.json``) and reused while the model, data and prompt format are the same.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.tofu import load_tofu_split
from ..loss.share_masks import answer_token_nll
from ..loss.tasks import prepare_dataset_for_training, surprise_score_rows
from ..reporting import write_json
from ..tokens import pad_token_id

SURPRISE_FILE = "surprise_scores.json"


def write_surprise_scores(
    model, tokenizer, path: str | Path, task_options: dict, meta: dict, batch_size: int = 16
) -> Path:
    """Score the forget split of ``task_options`` (the ``tofu`` task's options: data, forget split,
    prompt format) with ``model`` and write ``path`` (``meta``: what the scores were computed from,
    compared by :func:`surprise_scores_match`). Returns the path."""
    options = {k: v for k, v in task_options.items() if k not in ("strategy", "share", "surprise_scores")}
    options["split"] = options["forget_split"]
    rows = prepare_dataset_for_training("tofu", tokenizer, strategy="answer_only", **options)
    nll = answer_token_nll(model, rows, pad_token_id(tokenizer, model), batch_size=batch_size, progress=True)
    kw = {"num_authors": options.get("num_authors", 200), "seed": options.get("seed", 0)}
    qa = load_tofu_split(options.get("source"), options["forget_split"], **kw)
    write_json({"meta": meta, "rows": surprise_score_rows(qa, nll)}, path)
    return Path(path)


def surprise_scores_match(path: str | Path, meta: dict) -> bool:
    """Whether ``path`` holds scores computed from ``meta``'s model, data and prompt format."""
    try:
        return json.loads(Path(path).read_text())["meta"] == meta
    except (OSError, ValueError, KeyError):
        return False
