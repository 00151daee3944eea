"""``forgetful train-forget``: train a forget-mask policy and the LM with REINFORCE, then score the
policy against the baselines on held-out data. The training options are
:class:`~forgetful.input.reinforce.ForgetTrainingConfig`'s fields (``--out`` is its
``output_dir``, ``--batch-size`` its ``per_device_train_batch_size``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..errors import ForgetfulError
from ..input.evaluation import baseline_masks, batches_of, evaluate_strategy
from ..input.examples import load_forget_examples
from ..input.options import DEFAULT_KEEP_RATIO, TextWindowOptions, parse_keep
from ..input.policies import build_mask, mask_names
from ..input.reinforce import ForgetMaskTrainer, ForgetTrainingConfig
from ..models import load_model
from ..reporting import plot_lines, write_json


@dataclass(kw_only=True)
class TrainForgetArguments(TextWindowOptions):
    model: str = field(metadata={"help": "The base LM: a folder (save_pretrained) or a Hub name."})
    mask: str = field(default="mlp", metadata={"help": "Learned policy: mlp, cnn_mlp, rnn or birnn."})
    method: Literal["reinforce", "two_step"] = field(
        default="reinforce", metadata={"help": "reinforce (joint) or two_step (alternating)."}
    )
    keep: float = field(
        default=DEFAULT_KEEP_RATIO,
        metadata={"help": "Share of the context kept (keep_ratio), in (0, 1]; other values are refused."},
    )
    exploration: str = field(
        default="0.75,0.5,0.25,0",
        metadata={
            "help": "One entry per epoch. reinforce: share of random keep sets (0.75,0.5,0.25,0); "
            "two_step: true = LM epoch on random masks, false = policy epoch (true,false,true,false)."
        },
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Text or JSON (context/target) file; default: embedded biographies."}
    )
    eval_file: str | None = field(
        default=None, metadata={"help": "Held-out data; default: embedded biographies (other seed)."}
    )
    max_examples: int | None = field(default=None, metadata={"help": "At most this many training examples."})
    embedded_examples: int = field(
        default=2000, metadata={"help": "Training examples generated when no --train-file is given."}
    )
    eval_examples: int = field(default=256, metadata={"help": "Held-out examples scored at the end."})
    policy_hidden_size: int = field(default=128, metadata={"help": "Policy width."})
    policy_kernel_size: int = field(default=5, metadata={"help": "cnn_mlp: convolution width (odd)."})
    policy_cell: Literal["gru", "lstm"] = field(default="gru", metadata={"help": "rnn/birnn: gru or lstm."})

    def __post_init__(self):
        (self.keep,) = parse_keep(self.keep)
        if self.mask not in mask_names(learned=True):
            raise ForgetfulError(
                f"unknown strategy '{self.mask}'; learned policies are {', '.join(mask_names(learned=True))}"
            )

    def policy_options(self) -> dict:
        """The options of the chosen policy."""
        cell = {"cell": self.policy_cell}
        extra = {"cnn_mlp": {"kernel_size": self.policy_kernel_size}, "rnn": cell, "birnn": cell}
        return {"hidden_size": self.policy_hidden_size, **extra.get(self.mask, {})}


ARGUMENTS = (TrainForgetArguments, ForgetTrainingConfig)


def parse_exploration(text: str, method: str) -> list:
    """One entry per epoch; an empty entry is refused, not dropped: ``0.5,,0`` is a typo, not two epochs."""
    parts = [p.strip().lower() for p in str(text).split(",")]
    if not any(parts):
        raise ForgetfulError("exploration is empty: give one entry per epoch, e.g. 0.75,0.5,0.25,0")
    if not all(parts):
        raise ForgetfulError(f"exploration {text!r} has an empty entry: give one entry per epoch, e.g. 0.75,0.5,0.25,0")
    if method == "two_step":
        table = {"true": True, "1": True, "lm": True, "false": False, "0": False, "policy": False}
        if any(p not in table for p in parts):
            raise ForgetfulError(
                f"two_step exploration entries are true (LM epoch) or false (policy epoch), got {text!r}"
            )
        return [table[p] for p in parts]
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ForgetfulError(f"reinforce exploration entries are numbers in [0, 1], got {text!r}") from None


def run(a: TrainForgetArguments, config: ForgetTrainingConfig) -> dict:
    from accelerate import PartialState

    if config.output_dir is None:
        raise ForgetfulError("--out is required: the folder for lm/, policy/, checkpoints and results.json")
    exploration = parse_exploration(a.exploration, a.method)
    out = Path(config.output_dir)
    (out / "results.json").unlink(missing_ok=True)
    if config.run_name == ForgetTrainingConfig.run_name:
        config.run_name = f"forget-{a.mask}"
    model, tok = load_model(a.model)
    data_kw = dict(**a.window_options(), seed=config.seed)
    train = load_forget_examples(
        a.train_file, tok, max_examples=a.max_examples, embedded_examples=a.embedded_examples, **data_kw
    )
    if a.eval_file is not None:
        held = load_forget_examples(a.eval_file, tok, max_examples=a.eval_examples, **data_kw)
    elif a.train_file is None:
        held = load_forget_examples(
            None, tok, embedded_examples=a.eval_examples, **{**data_kw, "seed": config.seed + 1234}
        )
    else:
        held = None
    # The policy's initial weights are a function of --seed alone: the global generator's state here
    # depends on what loading did before (which varies with Python's string-hash seed).
    torch.manual_seed(config.seed)
    policy = build_mask(a.mask, model, learned=True, **a.policy_options())
    trainer = ForgetMaskTrainer(
        model,
        policy,
        config,
        keep_ratio=a.keep,
        exploration_epochs=exploration,
        method=a.method,
        train_dataset=train,
        eval_dataset=held,
        tokenizer=tok,
    )
    result = trainer.train()
    trainer.save_model(out)
    if not PartialState().is_main_process:  # under a launcher, one process evaluates and writes the outputs
        return {}
    write_json(result.history, out / "history.json")
    steps = [h for h in result.history if "reward" in h]
    if steps:
        plot_lines(
            {"reward": ([h["step"] for h in steps], [h["reward"] for h in steps])},
            out / "reward.png",
            xlabel="step",
            ylabel="reward (-target NLL)",
            title=f"REINFORCE: {a.mask} policy",
        )
    final: dict = {
        "mask": a.mask,
        "method": a.method,
        "keep_ratio": a.keep,
        "exploration": exploration,
        "train_examples": len(train),
    }
    if held is not None:
        device = next(result.model.parameters()).device
        batches = batches_of(held, config.per_device_train_batch_size, tok.pad_token_id)
        strategies = {
            a.mask: result.policy,
            **baseline_masks(result.model, config.seed, ("identity", "random", "recency"), device),
        }
        for name, mask in strategies.items():
            res = evaluate_strategy(
                result.model, mask, batches, keep_ratio=a.keep, pad_token_id=tok.pad_token_id, device=device
            )
            final[f"{name}_nll"] = res["nll"]
        print(
            f"held-out target NLL at keep {a.keep:.2f}: "
            + ", ".join(f"{k[:-4]} {v:.3f}" for k, v in final.items() if k.endswith("_nll"))
        )
    write_json(final, out / "results.json")
    return final
