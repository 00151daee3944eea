"""The input-forgetting experiment with a fair protocol (``forgetful forget-experiment``).

Every strategy gets the same chance to adapt, at equal kept budgets and on the same targets:

* ``policy_<p>_<learner>_<keep>_s<seed>``: a learned policy fitted on the **frozen** base LM at that
  budget by a learner (:mod:`.learners`: ``reinforce``, ``relaxed``, ``supervised``), one run per
  seed; the version best on validation rows held out of training is kept (the untrained prior
  included, so a policy never ends worse than its prior *on those rows*; that figure is a selection
  statistic, never reported as a result);
* ``oracle_<keep>``: the oracle (:mod:`.policies.oracle`), a reference that reads the target, on the
  first ``oracle_examples`` held-out rows, starting from the best zero-shot baseline: the headroom
  any selector could gain;
* ``zero_shot_<keep>``: every strategy, learned policies included, scored on the base LM as it comes;
  for each learned policy also ``flops_matched`` (recency) at the keep ratio of the same FLOPs;
* ``ft_<strategy>_<keep>``: each strategy scored on an LM finetuned to read that strategy's own
  keep sets, **every LM on the same training rows for the same epochs** (``lm_sequences``); a
  learned policy (seed 0 of each learner) is frozen meanwhile; ``ft_identity`` finetunes at full
  context. Scorers (attention, self-information, a policy's early layers) read the frozen base LM.

Tasks: ``tofu_qa`` (an author's answers among others', one of their questions), ``multihop`` (a
question whose bridge entity is only in the passage) and ``text`` (WikiText-style windows, with the
``unread_length`` tokens after each target scored too: the headroom that survives without the
target). Held-out groups: authors, or blocks of ``block_windows`` contiguous windows. Comparisons
(:mod:`.experiment_results`) are paired over those groups, with an interval and an exact or Monte
Carlo sign-flip p. ``results.json`` holds ``env`` (GPU, versions, git commit) and the rows; each run
is written as soon as it finishes, under a file lock, so several processes (one per keep ratio,
say) can share one folder; finished runs are skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState

from ..errors import ForgetfulError, check_choices
from ..measure import run_environment
from ..models import bf16_autocast, load_model
from .examples import load_forget_examples
from .experiment_results import read_results, record_run, rewrite_report
from .experiment_runs import scored_run
from .learners import LEARNERS, RelaxedConfig, SupervisedConfig, check_learners
from .options import DEFAULT_KEEP_RATIO, TextWindowOptions, parse_keep
from .policies import is_learned, mask_names, parse_strategy
from .policy_training import train_policy
from .reinforce import ForgetTrainingConfig
from .strategy import split_strategies

# the task's default unit (for learned policies and ``@unit`` in strategy lists) and residual prior
TASK_UNIT = {"tofu_qa": "task", "multihop": "task", "text": "sentence"}
TASK_PRIOR = {"tofu_qa": "lexical", "multihop": "lexical:rounds=2", "text": "recency"}
PRIOR_NAMES = "random,recency,lexical,attention_score,self_information"


def names(text: str) -> list[str]:
    """A comma-separated list of plain names (runs, learners), without empty entries."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


@dataclass(kw_only=True)
class ForgetExperimentConfig(TextWindowOptions):
    """What the experiment compares; the training options are :class:`ForgetTrainingConfig`'s
    (``--out`` is the experiment's folder; the LM finetuning of every strategy uses its LM options,
    the policy training its policy options)."""

    model: str = field(metadata={"help": "The base LM: smollm2-135m, a folder or a Hub name."})
    task: Literal["tofu_qa", "multihop", "text"] = field(
        default="tofu_qa", metadata={"help": "tofu_qa, multihop (questions whose bridge is in the passage) or text."}
    )
    data: str | None = field(default=None, metadata={"help": "tofu_qa: the TOFU folder (default: embedded data)."})
    train_file: str | None = field(default=None, metadata={"help": "text: the training text file."})
    eval_file: str | None = field(default=None, metadata={"help": "text: the held-out text file."})
    keep: str = field(
        default=f"{DEFAULT_KEEP_RATIO:g}", metadata={"help": "Keep ratios, comma separated, each in (0, 1)."}
    )
    unit: str | None = field(
        default=None,
        metadata={
            "help": "What learned policies keep whole, and what '@unit' in the strategy lists means: token, sentence, "
            "chunk:N or task (default: task for tofu_qa and multihop, sentence for text)."
        },
    )
    zero_shot: str = field(
        default=f"identity,none,{PRIOR_NAMES},random@unit,recency@unit,lexical@unit,attention_score@unit,"
        "self_information@unit,snapkv:layer=4@unit,gemfilter:layer=4@unit,gemfilter@unit",
        metadata={
            "help": "Baselines scored on the base LM (learned policies are always added), each "
            "name[:key=value,...][@unit] (@unit: the task's unit)."
        },
    )
    finetuned: str = field(
        # the strongest baselines first: a run cut short by its time limit loses the least telling rows
        default="identity,lexical@unit,attention_score@unit,recency@unit,random@unit,self_information@unit,"
        f"{PRIOR_NAMES}",
        metadata={"help": "Baselines that each get an LM finetuned on their own keep sets (learned policies too)."},
    )
    oracle: str = field(
        default="oracle@unit",
        metadata={
            "help": "The oracle that reads the target (headroom), e.g. oracle:rounds=4@unit; it starts from the best "
            "zero-shot baseline at its keep ratio unless start= is given; '' for none."
        },
    )
    oracle_examples: int | None = field(
        default=None, metadata={"help": "Held-out rows the oracle scores (the first ones; default: all)."}
    )
    flops_matched: str = field(
        default="recency",
        metadata={"help": "Scored zero-shot at the keep ratio whose FLOPs equal each learned policy's ('': none)."},
    )
    policies: str = field(default="residual", metadata={"help": "Learned policies (trained on the frozen base LM)."})
    saved_policies: str = field(
        default="",
        metadata={"help": "Folders of saved policies (trained elsewhere) also scored zero-shot, comma separated."},
    )
    learners: str = field(
        default="reinforce", metadata={"help": f"Learners of each policy, comma separated: {', '.join(LEARNERS)}."}
    )
    seeds: str = field(default="0", metadata={"help": "Seeds of the learned policies, comma separated (e.g. 0,1,2)."})
    prior: str | None = field(
        default=None,
        metadata={
            "help": "The residual policy's prior: recency, lexical, attention_score or self_information, with options "
            "(lexical:rounds=2, multi-hop's default)."
        },
    )
    policy_layer: int = field(default=4, metadata={"help": "Early layer whose hidden states the policy reads."})
    policy_forget_layer: int = field(
        default=0, metadata={"help": "Learned policies drop tokens after this many layers (0: at the input)."}
    )
    policy_hidden_size: int = field(default=128, metadata={"help": "Width of the learned policy."})
    policy_steps: int = field(default=500, metadata={"help": "Steps of each learner (relaxed: see match_lm_tokens)."})
    policy_eval_steps: int = field(default=100, metadata={"help": "Score the policy on validation rows every N steps."})
    warm_rows: int = field(
        default=0, metadata={"help": "REINFORCE: training rows labelled for a leave-one-unit-out warm start (0: none)."}
    )
    warm_steps: int = field(default=200, metadata={"help": "REINFORCE: steps of the warm start."})
    val_examples: int = field(
        default=96, metadata={"help": "Training rows held out of policy training to pick the best policy."}
    )
    finetune_epochs: int = field(default=1, metadata={"help": "Epochs of LM finetuning, the same for every strategy."})
    train_examples: int | None = field(default=None, metadata={"help": "At most this many training examples."})
    eval_examples: int | None = field(default=None, metadata={"help": "At most this many held-out examples."})
    questions_per_author: int = field(default=10, metadata={"help": "tofu_qa: held-out questions per author."})
    held_out_authors: int = field(
        default=20, metadata={"help": "tofu_qa: the last N authors are held out (never in a training passage)."}
    )
    num_authors: int = field(default=200, metadata={"help": "tofu_qa on the embedded data: authors generated."})
    unread_length: int = field(
        default=32, metadata={"help": "text: tokens after each target scored too (what survives without it; 0: none)."}
    )
    block_windows: int = field(default=10, metadata={"help": "text: contiguous held-out windows per bootstrap group."})
    eval_batch_size: int = field(
        default=16, metadata={"help": "Rows per evaluation batch (also for generating answers)."}
    )
    max_new_tokens: int = field(default=48, metadata={"help": "tofu_qa: longest generated answer (0: no ROUGE)."})
    timing_repeats: int = field(default=5, metadata={"help": "Timed forwards per strategy (0: no timing)."})
    bootstrap: int = field(default=2000, metadata={"help": "Resamples of the paired bootstrap."})
    only: str | None = field(
        default=None,
        metadata={"help": "Run only these runs now (policy_residual_reinforce_0.5_s0, zero_shot_0.5, ...)."},
    )
    time_budget: float | None = field(
        default=None,
        metadata={
            "help": "Seconds this call may take (positive): a run starts only if its expected time (the mean of "
            "finished runs of its kind, else 300 s) fits in what is left; finished runs are kept."
        },
    )
    report_only: bool = field(
        default=False,
        metadata={"help": "Run nothing: make the comparisons and report.md of --out again from its files."},
    )

    def __post_init__(self):
        check_choices(self)
        from .units import check_unit

        self.keep_ratios = parse_keep(self.keep, allow_one=False)
        self.unit = check_unit(self.unit or TASK_UNIT[self.task])
        self.prior = self.prior or TASK_PRIOR[self.task]
        for name in ("finetune_epochs", "policy_steps", "policy_eval_steps", "bootstrap", "block_windows"):
            if getattr(self, name) < 1:
                raise ForgetfulError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ForgetfulError(f"time_budget must be positive seconds, got {self.time_budget}")
        if self.unread_length < 0 or self.policy_forget_layer < 0:
            raise ForgetfulError("unread_length and policy_forget_layer must be >= 0")
        check_learners(names(self.learners))
        try:
            self.seed_list = sorted({int(s) for s in names(self.seeds)})
        except ValueError:
            raise ForgetfulError(f"seeds must be integers like 0,1,2, got {self.seeds!r}") from None
        if not self.seed_list:
            raise ForgetfulError("seeds: give at least one seed")
        known = set(mask_names())
        for option in ("zero_shot", "finetuned", "policies", "flops_matched", "oracle"):
            for spec in self.strategies(option):
                if parse_strategy(spec).name not in known:
                    raise ForgetfulError(f"{option}: unknown strategy {spec}; known: {', '.join(sorted(known))}")
        baselines = self.strategies("zero_shot") + self.strategies("finetuned") + self.strategies("flops_matched")
        if any(is_learned(s) for s in baselines) or not all(is_learned(s) for s in self.strategies("policies")):
            raise ForgetfulError(
                "zero_shot, finetuned and flops_matched take strategies that are not learned; policies takes learned ones"
            )
        if any(parse_strategy(s).name != "oracle" for s in self.strategies("oracle")):
            raise ForgetfulError(f"oracle takes the oracle strategy (oracle[:options]@unit), got {self.oracle!r}")
        for folder in split_strategies(self.saved_policies):
            if not (Path(folder) / "policy_config.json").is_file():
                raise ForgetfulError(f"saved_policies: {folder} is not a saved policy (no policy_config.json)")
        if self.task == "text" and (self.train_file is None or self.eval_file is None):
            raise ForgetfulError("the text task needs --train-file and --eval-file")

    def strategies(self, option: str) -> list[str]:
        """The strategy names of ``option`` (``zero_shot``, ``finetuned``, ``policies``, ...) with
        ``@unit`` spelled out; a token-level unit spelled out is the plain name (no duplicates)."""
        out = []
        for spec in split_strategies(getattr(self, option) or ""):
            head, _, unit = spec.partition("@")
            unit = self.unit if unit == "unit" else unit
            spec = head if not unit or unit == "token" else f"{head}@{unit}"
            spec = str(parse_strategy(spec))
            if spec not in out:
                out.append(spec)
        return out

    def learned_runs(self, keep: float) -> list[tuple[str, str, str, int]]:
        """(run name, policy, learner, seed) of every learned policy at ``keep``."""
        return [
            (f"policy_{p.split('@')[0]}_{learner}_{keep:g}_s{seed}", p, learner, seed)
            for p in self.strategies("policies")
            for learner in names(self.learners)
            for seed in self.seed_list
        ]

    def runs(self) -> list[tuple[str, str, str, float | None]]:
        """(run name, protocol, strategy, keep ratio or None for every ratio), in the order that
        answers the question first: policies, zero-shot, the oracle (it starts from the best
        zero-shot baseline), then the finetuned LMs (the learned policies' - seed 0 of each learner -
        before the baselines'), per keep ratio."""
        out = []
        for k in self.keep_ratios:
            out += [(name, "policy", f"{p}|{learner}|{seed}", k) for name, p, learner, seed in self.learned_runs(k)]
            out.append((f"zero_shot_{k:g}", "zero_shot", "", k))
            out += [(f"oracle_{k:g}", "oracle", s, k) for s in self.strategies("oracle")]
        baselines = self.strategies("finetuned")
        if "identity" in baselines:
            out.append(("ft_identity", "finetuned", "identity", None))
        first = self.seed_list[0]
        for k in self.keep_ratios:
            out += [
                (f"ft_{name[len('policy_') :]}", "finetuned", f"{p}|{learner}|{seed}", k)
                for name, p, learner, seed in self.learned_runs(k)
                if seed == first
            ]
            out += [(f"ft_{s}_{k:g}", "finetuned", s, k) for s in baselines if s != "identity"]
        return out


# -- the runs -----------------------------------------------------------------------------------


def run_forget_experiment(
    config: ForgetExperimentConfig,
    training: ForgetTrainingConfig,
    relaxed: RelaxedConfig | None = None,
    supervised: SupervisedConfig | None = None,
) -> list[dict]:
    if training.output_dir is None:
        raise ForgetfulError("--out is required: the experiment's folder")
    relaxed, supervised = relaxed or RelaxedConfig(), supervised or SupervisedConfig()
    out = Path(training.output_dir)
    if config.report_only:
        return rewrite_report(out, config, training)
    _, rows = read_results(out)
    done = {r["run"] for r in rows} - stale_zero_shot_runs(config, rows)
    only = None if config.only is None else set(names(config.only))
    known = {name for name, *_ in config.runs()}
    if only is not None and not only <= known:
        raise ForgetfulError(f"--only names unknown runs {sorted(only - known)}; runs are {', '.join(sorted(known))}")
    cpu = training.use_cpu or not torch.cuda.is_available()
    device = PartialState(cpu=cpu).device
    env = run_environment(device)
    base, tok = load_model(config.model)
    base.to(device).eval()
    for p in base.parameters():  # the base LM is never trained here: scorers and policies read it
        p.requires_grad_(False)
    data = experiment_data(config, tok, training.seed)
    autocast = bf16_autocast(device)
    began = time.perf_counter()
    for name, protocol, strategy, keep in config.runs():
        if name in done or (only is not None and name not in only):
            continue
        if config.time_budget is not None:
            expected, basis = expected_seconds(protocol, strategy, rows)
            left = config.time_budget - (time.perf_counter() - began)
            if expected > left:
                print(
                    f"[{name}] not started: expected {expected:.0f} s ({basis}), {max(left, 0):.0f} s left", flush=True
                )
                continue
        start = time.perf_counter()
        print(f"[{name}]", flush=True)
        if protocol == "policy":
            policy, learner, seed = strategy.split("|")
            found = [
                train_policy(
                    config, training, base, tok, data, policy, learner, int(seed), keep, out, autocast,
                    relaxed=relaxed, supervised=supervised, run_name=name,
                )
            ]  # fmt: skip
            per_example = {}
        else:
            found, per_example = scored_run(
                config, training, base, tok, data, name, protocol, strategy, keep, out, autocast
            )
        for r in found:
            r.update(task=config.task, run=name, seconds=round(time.perf_counter() - start, 1))
        rows = record_run(out, name, found, per_example, env, config, training)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


DEFAULT_RUN_SECONDS = 300.0


def expected_seconds(protocol: str, strategy: str, rows: list[dict]) -> tuple[float, str]:
    """How long a run of ``protocol`` is expected to take (``--time-budget``): the mean ``seconds`` of
    finished runs of its kind (a policy run: of its learner), else :data:`DEFAULT_RUN_SECONDS`."""
    kind = "policy_training" if protocol == "policy" else protocol
    learner = strategy.split("|")[1] if protocol == "policy" else None
    seen: dict[str, float] = {}
    for r in rows:
        same = bool(r.get("reference")) if kind == "oracle" else r["protocol"] == kind and not r.get("reference")
        if same and "seconds" in r and (learner is None or r.get("learner") == learner):
            seen[r["run"]] = r["seconds"]  # one figure per run (a run's rows share it)
    if not seen:
        return DEFAULT_RUN_SECONDS, "no finished run of its kind yet"
    return sum(seen.values()) / len(seen), f"mean of {len(seen)} finished run(s) of its kind"


def stale_zero_shot_runs(config: ForgetExperimentConfig, rows: list[dict]) -> set[str]:
    """Zero-shot runs made before some learned policy of this configuration existed (another
    seed or learner, added later): they are made again, with every policy."""
    stale = set()
    for keep in config.keep_ratios:
        name = f"zero_shot_{keep:g}"
        have = {(r.get("learner"), r.get("seed")) for r in rows if r["run"] == name}
        want = {(learner, seed) for _, _, learner, seed in config.learned_runs(keep)}
        if have and not want <= have:
            stale.add(name)
    return stale


@dataclass
class ExperimentData:
    """Training rows for the LMs, the rows policies train on, validation rows held out of those to
    pick policies, and the held-out evaluation rows."""

    train: object
    policy_train: object
    val: object
    held: object


def experiment_data(config: ForgetExperimentConfig, tok, seed: int) -> ExperimentData:
    if config.task == "tofu_qa":
        from .examples import tofu_qa_examples

        kw = dict(seed=seed, num_authors=config.num_authors, held_out=config.held_out_authors)
        train = tofu_qa_examples(tok, config.data, part="train", **kw)
        held = tofu_qa_examples(tok, config.data, part="eval", questions_per_author=config.questions_per_author, **kw)
    elif config.task == "multihop":
        from .examples import multihop_examples

        # rows cycle through each part's authors: as many training rows as asked (default 1,600), one
        # held-out row per eval author unless eval_examples asks for more
        train = multihop_examples(tok, part="train", n=config.train_examples or 1600, seed=seed)
        held = multihop_examples(tok, part="eval", n=config.eval_examples, seed=seed)
    else:
        kw = dict(context_length=config.context_length, target_length=config.target_length, seed=seed)
        train = load_forget_examples(config.train_file, tok, stride=config.stride, **kw)
        # held-out windows never overlap; each also carries the tokens after its target
        held = load_forget_examples(config.eval_file, tok, unread_length=config.unread_length, **kw)
        held = held.add_column("group", [i // config.block_windows for i in range(len(held))])
    if config.train_examples is not None:
        train = train.shuffle(seed=seed).select(range(min(config.train_examples, len(train))))
    if config.eval_examples is not None:
        held = held.select(range(min(config.eval_examples, len(held))))
    rest, val = validation_split(train, config.val_examples, seed)
    return ExperimentData(train, rest, val, held)


def validation_split(train, size: int, seed: int):
    """``(rest, validation)``: about ``size`` training rows to pick policies on, whole groups
    (authors) where rows have them, and the rows that policies train on."""
    from collections import Counter

    if size < 1:
        raise ForgetfulError(f"val_examples must be at least 1, got {size}")
    if size >= len(train):
        raise ForgetfulError(f"val_examples ({size}) must leave training rows ({len(train)} in all)")
    order = train.shuffle(seed=seed + 1)
    if "group" not in order.column_names:
        return order.select(range(size, len(order))), order.select(range(size))
    groups = order["group"]
    sizes, chosen, count = Counter(groups), set(), 0
    for g in dict.fromkeys(groups):
        if count >= size:
            break
        chosen.add(g)
        count += sizes[g]
    picked = [i for i, g in enumerate(groups) if g in chosen]
    rest = [i for i, g in enumerate(groups) if g not in chosen]
    return order.select(rest), order.select(picked[:size])
