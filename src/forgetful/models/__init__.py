"""Models: loading any causal LM and its tokenizer from a folder or the Hub
(:mod:`~forgetful.models.loading`), and the built-in configs initialised locally
(:mod:`~forgetful.models.builtin`)."""

from .loading import bf16_autocast, bf16_native, build_model, check_vocab, count_parameters, load_model, load_tokenizer

__all__ = [
    "bf16_autocast",
    "bf16_native",
    "build_model",
    "check_vocab",
    "count_parameters",
    "load_model",
    "load_tokenizer",
]
