"""Where the real datasets come from: a choice, not an assumption about the checkout.

Every data option takes, besides a path, a Hub name or ``embedded``, the name of a known dataset:

* ``tofu``: TOFU's splits (``<split>.json``);
* ``wikitext2:train`` / ``wikitext2:valid`` / ``wikitext2:test``: WikiText-2 (the tokenised form,
  one line per row).

A name resolves to ``$FORGETFUL_DATA/tofu`` or ``$FORGETFUL_DATA/wikitext2/<split>.txt`` when the
environment variable ``FORGETFUL_DATA`` names a data folder (laid out like ``../shared/data``), and
to the Hub otherwise (``locuslab/TOFU``; ``wikitext`` with the ``wikitext-2-v1`` configuration),
through ``datasets``. Offline without either, loading fails with one line naming both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ForgetfulError

DATA_ENV = "FORGETFUL_DATA"


@dataclass(frozen=True)
class NamedDataset:
    local: str  # path under $FORGETFUL_DATA
    hub: str  # the Hub dataset
    config: str | None = None  # its configuration
    split: str = "train"  # its split


NAMED: dict[str, NamedDataset] = {
    "tofu": NamedDataset("tofu", "locuslab/TOFU"),
    "wikitext2:train": NamedDataset("wikitext2/train.txt", "wikitext", "wikitext-2-v1", "train"),
    "wikitext2:valid": NamedDataset("wikitext2/valid.txt", "wikitext", "wikitext-2-v1", "validation"),
    "wikitext2:test": NamedDataset("wikitext2/test.txt", "wikitext", "wikitext-2-v1", "test"),
}


def data_root() -> Path | None:
    """The folder ``$FORGETFUL_DATA`` names, checked; None when it is not set."""
    root = os.environ.get(DATA_ENV)
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ForgetfulError(
            f"{DATA_ENV}={root} is not a folder: point it at a data folder laid out like ../shared/data"
        )
    return path


@dataclass(frozen=True)
class Resolved:
    """A data source made concrete: a local path, or a Hub dataset with its configuration and split."""

    source: str
    config: str | None = None
    split: str = "train"
    named: str | None = None  # the known dataset it came from

    @property
    def on_hub(self) -> bool:
        return self.named is not None and self.source == NAMED[self.named].hub

    def offline_hint(self) -> str:
        """How to work without the Hub, for the error of a failed load."""
        local = NAMED[self.named].local if self.named else "the data"
        return f"set {DATA_ENV} to a data folder that holds {local} (like ../shared/data), or pass a local path"


def resolve(source: str | os.PathLike) -> Resolved:
    """A known dataset's name made concrete (see the module docstring); anything else unchanged."""
    name = str(source)
    if name not in NAMED:
        return Resolved(name)
    spec = NAMED[name]
    root = data_root()
    if root is None:
        return Resolved(spec.hub, spec.config, spec.split, named=name)
    path = root / spec.local
    if not path.exists():
        raise ForgetfulError(
            f"{name}: {path} does not exist ({DATA_ENV}={root}); unset {DATA_ENV} to load it from the Hub"
        )
    return Resolved(str(path), named=name)


def known_names() -> str:
    return ", ".join(NAMED)
