"""The TOFU experiment's recipes, finetuning and unlearning, by name (``tofu-experiment --recipe``).

* ``open_unlearning``: open-unlearning's TOFU finetuning recipe, the defaults of
  :class:`~forgetful.loss.unlearning.OpenUnlearningRecipe`: lr 1e-5, 5 epochs, 8 rows x 4
  accumulation steps, weight decay 0.01, one warm-up epoch. It is tuned for 1-8 B models.
* ``smollm2``: the recipe of the built-in small model (SmolLM2-135M): lr 1e-4, 5 epochs, 32 rows
  x 1 accumulation step; the rest as open-unlearning's. Measured on an H200 (forget10, batch 32 x
  1): at lr 1e-5 SmolLM2 barely learns TOFU (train loss 1.88), so the full model is no different
  from the retain model and forget quality is 1.0 for every run, which says nothing; at lr 1e-4 for
  5 epochs it memorises (full forget quality 8e-17, forget probability 0.553 against the retain
  model's 0.148) and keeps its utility (model utility 0.355 against the retain model's 0.346).
* ``demo``: the demo's 1 M-parameter model on the embedded data: lr 3e-4, 20 epochs, 32 x 1
  (unlearning: lr 1e-4).
* ``auto`` (the default): the recipe of a built-in small model named by ``--model``
  (:data:`MODEL_RECIPES`), else ``open_unlearning``.

A recipe sets the finetuning options :data:`RECIPE_OPTIONS` and the unlearning runs' own
:data:`UNLEARN_OPTIONS` (open-unlearning's unlearning recipe: lr 1e-5, 10 epochs, weight decay 0.01,
a warm-up epoch; the unlearning runs share the finetuning batch sizes), except those the user set (a
flag or a config key, or an argument a library caller gave): those always win. One registry, for
finetuning and unlearning, the demo's included.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import MISSING, fields

from ..errors import ForgetfulError
from ..loss.unlearning import OpenUnlearningRecipe

#: the training options a recipe sets
RECIPE_OPTIONS = (
    "learning_rate",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "warmup_epochs",
)


def _open_unlearning() -> dict:
    """open-unlearning's values: the option defaults, declared once in :class:`OpenUnlearningRecipe`."""
    defaults = {f.name: f.default for f in fields(OpenUnlearningRecipe) if f.default is not MISSING}
    return {name: defaults[name] for name in RECIPE_OPTIONS}


TOFU_RECIPES: dict[str, dict] = {
    "open_unlearning": _open_unlearning(),
    "smollm2": {
        **_open_unlearning(),
        "learning_rate": 1e-4,
        "per_device_train_batch_size": 32,
        "gradient_accumulation_steps": 1,
    },
    # the demo's tiny model (1 M parameters, embedded data): it needs more epochs at a higher rate
    "demo": {
        **_open_unlearning(),
        "learning_rate": 3e-4,
        "num_train_epochs": 20.0,
        "per_device_train_batch_size": 32,
        "gradient_accumulation_steps": 1,
    },
}
#: the unlearning options a recipe sets (``tofu-experiment``'s ``unlearn_*``: the unlearning runs share
#: the finetuning batch sizes, optimizer and precision)
UNLEARN_OPTIONS = ("unlearn_learning_rate", "unlearn_epochs", "unlearn_weight_decay", "unlearn_warmup_epochs")
#: open-unlearning's unlearning recipe (``configs/experiment/unlearn/tofu/*.yaml``: lr 1e-5, 10 epochs,
#: weight decay 0.01, a warm-up epoch)
_OPEN_UNLEARNING_UNLEARN = dict(zip(UNLEARN_OPTIONS, (1e-5, 10.0, 0.01, 1.0)))
UNLEARN_RECIPES: dict[str, dict] = {
    "open_unlearning": _OPEN_UNLEARNING_UNLEARN,
    "smollm2": _OPEN_UNLEARNING_UNLEARN,
    "demo": {**_OPEN_UNLEARNING_UNLEARN, "unlearn_learning_rate": 1e-4},
}
#: a warm-up the user gives in steps (or, before transformers 5, as a ratio), which the recipe's warm-up
#: epochs must not override
_OWN_WARMUP = ("warmup_steps", "warmup_ratio")
#: built-in model name -> the recipe ``auto`` picks for it
MODEL_RECIPES = {"smollm2-135m": "smollm2"}
RECIPE_CHOICES = ("auto", *TOFU_RECIPES)


def check_recipe(name: str) -> None:
    if name not in RECIPE_CHOICES:
        raise ForgetfulError(f"recipe must be one of {', '.join(RECIPE_CHOICES)}, got '{name}'")


def resolve_recipe(name: str, model: str) -> str:
    """The recipe ``name`` means for ``model``: ``auto`` is the built-in model's recipe, else
    open-unlearning's."""
    check_recipe(name)
    if name == "auto":
        return MODEL_RECIPES.get(model, "open_unlearning")
    return name


def options_set(training) -> set[str]:
    """The recipe options of ``training`` whose values differ from its class defaults: what a library
    caller who built it set (one who set an option to its default value names it in ``given``)."""
    defaults = {f.name: f.default for f in fields(type(training)) if f.default is not MISSING}
    return {n for n in (*RECIPE_OPTIONS, *_OWN_WARMUP) if n in defaults and getattr(training, n) != defaults[n]}


def apply_unlearn_recipe(config, name: str, model: str) -> dict:
    """Set the ``unlearn_*`` options of the experiment ``config`` that are unset (None) from recipe
    ``name`` (``auto`` resolved for ``model``); returns the values the unlearning runs take."""
    values = UNLEARN_RECIPES[resolve_recipe(name, model)]
    for option, value in values.items():
        if getattr(config, option) is None:
            setattr(config, option, value)
    return {option: getattr(config, option) for option in UNLEARN_OPTIONS}


def apply_recipe(training, name: str, model: str, given: Collection[str] | None = None) -> dict:
    """Set the options of recipe ``name`` (``auto`` resolved for ``model``) on ``training``, except
    the options in ``given`` (the user's; None: :func:`options_set`). Returns what results files
    record: the recipe asked for and the one applied, its values, and the options the user set to
    other values (``overridden``)."""
    applied = resolve_recipe(name, model)
    values = TOFU_RECIPES[applied]
    kept = options_set(training) if given is None else set(given)
    if kept & set(_OWN_WARMUP) and "warmup_epochs" not in kept:
        # the user's own warm-up, in steps or as a ratio: the recipe's warm-up epochs would override it
        training.warmup_epochs = None
        kept.add("warmup_epochs")
    for option, value in values.items():
        if option not in kept:
            setattr(training, option, value)
    overridden = {o: getattr(training, o) for o in RECIPE_OPTIONS if getattr(training, o) != values[o]}
    return {"asked": name, "name": applied, "values": dict(values), "overridden": overridden}
