"""The unlearning methods, one file each (open-unlearning's layout, ``src/trainer/unlearn/``), and
their one registry, :data:`UNLEARNING_METHODS` (name -> class), built here:

* ``grad_ascent`` (:mod:`.grad_ascent`): ``loss = -NLL_θ(forget)``;
* ``grad_diff`` (:mod:`.grad_diff`): ``loss = gamma * -NLL_θ(forget) + alpha * R``;
* ``npo`` (:mod:`.npo`): NPO against the model before unlearning;
* ``simnpo`` (:mod:`.simnpo`): NPO without a reference, on the length-normalised NLL;
* ``rmu`` (:mod:`.rmu`): the forget tokens' hidden states at one layer steered to a random direction.

What they share (the base class, the loss option defaults, the retain losses) is in :mod:`.base`.
The :class:`~forgetful.loss.unlearning.UnlearningTrainer` looks a method up by name
(:func:`unlearning_method`), builds it once with itself and asks it for the loss of every
micro-batch. A method of your own: subclass :class:`~.base.UnlearningMethod` and register it with
:func:`register_unlearning_method`.
"""

from __future__ import annotations

from collections.abc import Callable

from ...errors import ForgetfulError
from .base import LOSS_OPTION_DEFAULTS, UnlearningMethod
from .grad_ascent import GradAscent
from .grad_diff import GradDiff
from .npo import NPO
from .rmu import RMU
from .simnpo import SimNPO

#: every method by name, in the order help texts and reports list them
UNLEARNING_METHODS: dict[str, type[UnlearningMethod]] = {
    cls.name: cls for cls in (GradAscent, GradDiff, NPO, SimNPO, RMU)
}


def unlearning_method(name: str) -> type[UnlearningMethod]:
    """The method registered as ``name``."""
    if name not in UNLEARNING_METHODS:
        raise ForgetfulError(f"unknown unlearning method '{name}'; choose from {', '.join(UNLEARNING_METHODS)}")
    return UNLEARNING_METHODS[name]


def register_unlearning_method(name: str, **defaults) -> Callable[[type[UnlearningMethod]], type[UnlearningMethod]]:
    """Class decorator for a method of your own: make it available by ``name``, with its own
    ``defaults`` for the loss options (the others take :data:`~.base.LOSS_OPTION_DEFAULTS`)."""

    def deco(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
        cls.name = name
        cls.defaults = {**LOSS_OPTION_DEFAULTS, **defaults}
        UNLEARNING_METHODS[name] = cls
        return cls

    return deco
