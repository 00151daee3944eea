"""``forgetful pretrain``: train a base causal LM (built-in configs or any HF model)."""

from __future__ import annotations

from ..loss.pretrain import PretrainConfig, PretrainTrainingArguments, run_pretrain

ARGUMENTS = (PretrainConfig, PretrainTrainingArguments)


def run(config: PretrainConfig, training: PretrainTrainingArguments) -> dict:
    from accelerate import PartialState

    results = run_pretrain(config, training)
    if PartialState().is_main_process:
        print(
            f"trained {results['steps']} steps; held-out loss {results['eval_loss']:.4f} "
            f"(perplexity {results['eval_ppl']:.2f}); wrote {config.out}"
        )
    return results
