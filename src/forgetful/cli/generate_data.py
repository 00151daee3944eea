"""``forgetful generate-data``: write the embedded data to files, for inspection or other tools.

* ``corpus.txt`` - the pretraining documents, one per line (newlines inside escaped as spaces);
* ``forget_train.jsonl`` / ``forget_eval.jsonl`` - input-forgetting examples (``context``,
  ``target``, ``fact_spans``), from different seeds;
* ``tofu/`` - every TOFU split as ``<split>.json`` (JSON lines), like ../shared/data/tofu.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.embedded import pretraining_documents
from ..data.sources import write_jsonl
from ..data.tofu import write_tofu_folder
from ..errors import ForgetfulError
from ..input.examples import embedded_qa_rows
from ..reporting import write_text


@dataclass
class GenerateDataArguments:
    out: str = field(metadata={"help": "Output folder."})
    corpus_docs: int = field(default=4000, metadata={"help": "Documents of the pretraining corpus."})
    forget_examples: int = field(default=2000, metadata={"help": "Input-forgetting (biography question) examples."})
    eval_examples: int = field(default=256, metadata={"help": "Held-out input-forgetting examples."})
    tofu_authors: int = field(default=200, metadata={"help": "Fictitious authors of the TOFU-shaped splits."})
    seed: int = field(default=0, metadata={"help": "Seed of the generator."})

    def __post_init__(self):
        for name in ("corpus_docs", "forget_examples", "eval_examples", "tofu_authors"):
            if getattr(self, name) < 1:
                raise ForgetfulError(f"{name} must be at least 1, got {getattr(self, name)}")


ARGUMENTS = (GenerateDataArguments,)


def run(a: GenerateDataArguments) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = pretraining_documents(a.corpus_docs, seed=a.seed)
    write_text("\n".join(d.replace("\n", " ") for d in docs) + "\n", out / "corpus.txt")
    write_jsonl(embedded_qa_rows(a.forget_examples, a.seed), out / "forget_train.jsonl")
    write_jsonl(embedded_qa_rows(a.eval_examples, a.seed + 1234), out / "forget_eval.jsonl")
    write_tofu_folder(out / "tofu", num_authors=a.tofu_authors, seed=a.seed)
    print(f"wrote {out}/corpus.txt, forget_train.jsonl, forget_eval.jsonl and tofu/")
