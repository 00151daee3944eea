"""The TOFU experiment's plan: which runs, at which seeds, over which grid, named how; and how long
a run not done yet is expected to take (``--time-budget``).

Grid syntax (``--grid``): methods separated by ``;``, each ``method:key=v1|v2|...,key=v|...``; a
method's points are the product of its keys' values, in the order written::

    npo:learning_rate=1e-5|3e-5|1e-4,beta=0.1|0.5;simnpo:delta=0|fitted,gamma=0.125|1

The keys are ``learning_rate`` (the unlearning learning rate) and the loss options the method reads
(:class:`~forgetful.loss.unlearning.UnlearningLossOptions`: ``beta``, ``alpha``, ``gamma``,
``retain_loss_type``, ``delta``, ``steering_coeff``, ``steering_scale``, ``rmu_layer``,
``rmu_params``); a value not given takes the experiment's option, and ``none`` unsets an option that
may be unset (``beta``, ``gamma``, ``retain_loss_type``: the method's default; ``steering_scale``: the
fixed ``steering_coeff``; ``rmu_layer``: layer 7 or the last). A method without a grid runs
once, at the experiment's options. Every unlearning run is also evaluated at the checkpoints of
``--eval-epochs`` (the same run, not a rerun).

Run names are built from what the run is, so that a second call finds the runs already done:
``retain``, ``full``, ``full_<strategy>`` (masked training), ``full_<strategy>_m<percent>`` (at a
mask share), ``full_<method>`` (unlearning at the experiment's options), ``full_<method>_<key><value>...``
(a grid point; keys shortened: :data:`SHORT_KEYS`), then ``_s<seed>`` for seeds other than 0 and,
for a checkpoint evaluated at epoch ``e``, ``_ep<e>``. Forget quality is always measured against
``retain`` (seed 0), which every plan holds.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
import statistics
from dataclasses import dataclass, field, fields

from ..data.tofu import RETAIN_FOR_FORGET
from ..errors import ForgetfulError
from ..loss.tasks import SHARE_STRATEGIES, TOFU_STRATEGIES
from ..loss.unlearn import UNLEARNING_METHODS, unlearning_method
from ..loss.unlearning import UnlearningLossOptions, method_loss_options
from .recipes import UNLEARN_RECIPES, resolve_recipe

#: the keys a grid takes, with the type their values parse to
GRID_KEYS = {"learning_rate": float} | {
    f.name: (int if "int" in str(f.type) else float if "float" in str(f.type) else str)
    for f in fields(UnlearningLossOptions)
}
#: the keys whose option may be unset: ``none`` in a grid unsets it (the method's default; for
#: ``steering_scale``, the fixed ``steering_coeff``)
UNSETTABLE = frozenset(f.name for f in fields(UnlearningLossOptions) if "None" in str(f.type))
#: how a key is written in run names
SHORT_KEYS = {
    "learning_rate": "lr",
    "steering_coeff": "steer",
    "steering_scale": "scale",
    "rmu_layer": "layer",
    "rmu_params": "params",
    "retain_loss_type": "retain",
}
#: seconds a run is expected to take when no run of its kind has finished yet (``--time-budget``)
DEFAULT_RUN_SECONDS = 300.0


@dataclass(kw_only=True)
class TofuGridOptions:
    """Grids, seeds, mask shares, checkpoint epochs and a time budget for ``tofu-experiment``."""

    grid: str | None = field(
        default=None,
        metadata={
            "help": "Per-method grids, 'method:key=v1|v2,key=v;method2:...' (keys: learning_rate and the method's "
            "loss options, e.g. 'npo:learning_rate=1e-5|3e-5,beta=0.1|0.5;rmu:steering_scale=none|1,rmu_params=wmdp|.*'; "
            "none unsets an optional one); each method must be in --unlearning and read its keys, else refused."
        },
    )
    seeds: str | None = field(
        default=None,
        metadata={
            "help": "Seeds, comma separated (e.g. 0,1,2): every run at each (names end in _s<seed> but for 0): its "
            "training order, random masks, RMU vector (and the embedded data); unlearning at seed s starts from the "
            "full run of seed s. Forget quality is always against retain at seed 0 (planned whatever the seeds). "
            "Default: --seed. Repeated seeds are refused."
        },
    )
    eval_epochs: str | None = field(
        default=None,
        metadata={
            "help": "Also evaluate each unlearning run at these epochs, comma separated whole numbers from 1 to "
            "--unlearn-epochs (e.g. 2,5,10; others are refused): the run's own checkpoints, deleted once evaluated; "
            "the last epoch is always evaluated."
        },
    )
    mask_shares: str | None = field(
        default=None,
        metadata={
            "help": "Mask these shares of the forget answers' tokens, comma separated in (0, 1] (e.g. 0.1,0.25,0.5): "
            "one run per share for each of --strategies that takes one (forget_facts: a random subset of the fact "
            "spans; goldfish: k = round(1/share); random: exactly that many; surprise: the base model's highest-NLL "
            "tokens)."
        },
    )
    time_budget: float | None = field(
        default=None,
        metadata={
            "help": "Seconds this call may take (positive): a run not done yet starts only if its expected time (the mean of "
            f"finished runs of its kind and strategy, else of its kind, else {DEFAULT_RUN_SECONDS:g} s) fits in "
            "what is left; finished runs are kept."
        },
    )


@dataclass(frozen=True)
class Run:
    """One training run: finetuning (``split``: the training split; ``strategy``: the masking
    strategy, at ``share``) or unlearning (``split``: the forget split; ``strategy``: the method, at
    the grid point ``point``), at ``seed``; an unlearning run is also evaluated at ``eval_epochs``."""

    name: str
    kind: str  # finetune | unlearn
    split: str
    strategy: str
    seed: int = 0
    share: float | None = None
    point: tuple[tuple[str, object], ...] = ()
    eval_epochs: tuple[int, ...] = ()

    def checkpoint_name(self, epoch: int) -> str:
        return f"{self.name}_ep{epoch}"

    def evaluated(self) -> list[str]:
        """The names of the points this run is evaluated as: its checkpoints, then itself."""
        return [self.checkpoint_name(e) for e in self.eval_epochs] + [self.name]


def names(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _value_name(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if text == ".*":
        return "all"
    if re.fullmatch(r"[A-Za-z0-9.+-]+", text):
        return text
    return "h" + hashlib.sha1(text.encode()).hexdigest()[:8]


def seed_suffix(seed: int) -> str:
    return "" if seed == 0 else f"_s{seed}"


def share_name(share: float) -> str:
    return f"m{share * 100:g}"


def parse_grid(text: str | None, methods: list[str]) -> dict[str, list[dict]]:
    """Per method named in ``text`` (see the module docstring), its points: dicts of key -> value.
    Refuses a method that is unknown or not in ``methods``, a key the method does not read, a value
    that does not parse."""
    grid: dict[str, list[dict]] = {}
    for part in (p.strip() for p in (text or "").split(";")):
        if not part:
            continue
        method, sep, body = part.partition(":")
        method = method.strip()
        if not sep or not body.strip():
            raise ForgetfulError(f"grid part '{part}' is not 'method:key=v1|v2,...'")
        if method not in UNLEARNING_METHODS:
            raise ForgetfulError(
                f"grid: unknown unlearning method '{method}'; choose from {', '.join(UNLEARNING_METHODS)}"
            )
        if method not in methods:
            raise ForgetfulError(f"grid: '{method}' is not among --unlearning ({', '.join(methods)}); add it there")
        if method in grid:
            raise ForgetfulError(f"grid: '{method}' appears twice; give each method one part")
        readable = {"learning_rate", *unlearning_method(method).options_of(UnlearningLossOptions())}
        axes = {}
        for item in (i.strip() for i in body.split(",") if i.strip()):
            key, eq, values = item.partition("=")
            key = key.strip()
            if not eq or not values.strip():
                raise ForgetfulError(f"grid: '{item}' in '{method}' is not key=v1|v2|...")
            if key not in readable:
                raise ForgetfulError(f"grid: {method} does not read '{key}'; its keys: {', '.join(sorted(readable))}")
            if key in axes:
                raise ForgetfulError(f"grid: '{key}' appears twice for {method}")
            axes[key] = [_parse(key, v.strip(), method) for v in values.split("|")]
        grid[method] = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    return grid


def _parse(key: str, value: str, method: str):
    kind = GRID_KEYS[key]
    if value == "none" and key in UNSETTABLE:
        return None
    if kind is str:
        return value
    try:
        return kind(value)
    except ValueError:
        raise ForgetfulError(
            f"grid: {method} {key}={value} is not {'an integer' if kind is int else 'a number'}"
        ) from None


def parse_numbers(text: str | None, what: str, kind=float) -> list:
    try:
        return [kind(x) for x in names(text)]
    except ValueError:
        raise ForgetfulError(
            f"{what} must be comma-separated {'integers' if kind is int else 'numbers'}, got '{text}'"
        ) from None


def checkpoint_epochs(text: str | None, epochs: float) -> tuple[int, ...]:
    """The checkpoint epochs of ``--eval-epochs`` before the last (``epochs``), sorted."""
    values = parse_numbers(text, "eval_epochs")
    bad = [e for e in values if e != int(e) or not 1 <= e <= epochs]
    if bad:
        raise ForgetfulError(
            f"eval_epochs must be whole numbers from 1 to --unlearn-epochs ({epochs:g}), got {bad[0]:g}"
        )
    return tuple(sorted({int(e) for e in values if e < epochs}))


def mask_shares(text: str | None) -> list[float]:
    shares = parse_numbers(text, "mask_shares")
    bad = [s for s in shares if not 0 < s <= 1]
    if bad:
        raise ForgetfulError(f"mask shares must lie in (0, 1], got {bad[0]:g}")
    return shares


def point_name(method: str, point: dict) -> str:
    return "_".join([f"full_{method}", *(f"{SHORT_KEYS.get(k, k)}{_value_name(v)}" for k, v in point.items())])


def plan_runs(a, seed: int = 0) -> list[Run]:
    """Every run of the experiment ``a`` (a :class:`~.experiment.TofuExperimentConfig`), in the order
    they depend on each other: ``retain`` (seed 0, the reference), then per seed the retain run (but
    for seed 0), the full run, the masked runs and the unlearning runs. ``seed``: the seed when
    ``a.seeds`` is unset."""
    if a.forget_split not in RETAIN_FOR_FORGET:
        raise ForgetfulError(f"forget split must be one of {', '.join(RETAIN_FOR_FORGET)}, got '{a.forget_split}'")
    strategies, methods = names(a.strategies), names(a.unlearning)
    choices = [s for s in TOFU_STRATEGIES if s != "answer_only"]
    bad = [s for s in strategies if s not in choices]
    if bad:
        raise ForgetfulError(f"unknown masking strategies {', '.join(bad)}; choose from {', '.join(choices)}")
    bad = [m for m in methods if m not in UNLEARNING_METHODS]
    if bad:
        raise ForgetfulError(f"unknown unlearning method '{bad[0]}'; choose from {', '.join(UNLEARNING_METHODS)}")
    shares = mask_shares(a.mask_shares)
    if "surprise" in strategies and not shares:
        raise ForgetfulError("the surprise strategy masks a share of the forget answers: give --mask-shares")
    grid = parse_grid(a.grid, methods)
    for method, points in grid.items():  # each point's options, checked before hours of finetuning
        for point in points:
            options = copy.copy(a)
            for key, value in point.items():
                setattr(options, key, value)
            method_loss_options(options, method)
    unlearn_epochs = a.unlearn_epochs
    if unlearn_epochs is None:  # not set: the recipe's
        unlearn_epochs = UNLEARN_RECIPES[resolve_recipe(a.recipe, a.model)]["unlearn_epochs"]
    epochs = checkpoint_epochs(a.eval_epochs, unlearn_epochs)
    seeds = parse_numbers(a.seeds, "seeds", int) if a.seeds else [seed]
    if len(set(seeds)) != len(seeds):
        raise ForgetfulError(f"seeds must differ, got {a.seeds}")
    retain = RETAIN_FOR_FORGET[a.forget_split]
    runs = [Run("retain", "finetune", retain, "answer_only")]
    for s in seeds:
        tail = seed_suffix(s)
        if s != 0:
            runs.append(Run(f"retain{tail}", "finetune", retain, "answer_only", s))
        runs.append(Run(f"full{tail}", "finetune", "full", "answer_only", s))
        for strategy in strategies:
            if shares and strategy in SHARE_STRATEGIES:
                runs += [
                    Run(f"full_{strategy}_{share_name(x)}{tail}", "finetune", "full", strategy, s, x) for x in shares
                ]
            else:
                runs.append(Run(f"full_{strategy}{tail}", "finetune", "full", strategy, s))
        for method in methods:
            for point in grid.get(method, [{}]):
                name = point_name(method, point) + tail
                runs.append(Run(name, "unlearn", a.forget_split, method, s, None, tuple(point.items()), epochs))
    return runs


def point_of(row: dict) -> str:
    """The name a row's point has at seed 0: what its runs at every seed share."""
    return re.sub(r"_s\d+(?=(_ep\d+)?$)", "", row["run"])


def estimate_seconds(run: Run, done: list[dict]) -> tuple[float, str]:
    """The expected seconds of ``run`` from the rows of finished runs (their ``seconds``, checkpoint
    rows left out: a run's row counts its checkpoints' evaluation): the mean over runs of its kind
    and strategy, else of its kind, else :data:`DEFAULT_RUN_SECONDS`; and what it is based on."""
    finished = [r for r in done if "seconds" in r and not r.get("checkpoint_of")]
    same = [r["seconds"] for r in finished if r.get("kind") == run.kind and r.get("strategy") == run.strategy]
    if same:
        return statistics.fmean(same), f"mean of {len(same)} finished {run.kind} run(s) of {run.strategy}"
    kind = [r["seconds"] for r in finished if r.get("kind") == run.kind]
    if kind:
        return statistics.fmean(kind), f"mean of {len(kind)} finished {run.kind} run(s)"
    return DEFAULT_RUN_SECONDS, "the default for a kind with no finished run"
