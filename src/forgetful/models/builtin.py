"""Built-in model configs, initialised locally: ``tiny-gpt2`` and ``tiny-llama`` (sized for a 2-core
CPU) and ``small-gpt2`` / ``small-llama`` (GPT-2-small size, for GPUs). Each gets a byte-level BPE
tokenizer trained with ``tokenizers`` on the chosen corpus and saved as a normal HF tokenizer, so
everything runs offline and ``AutoModelForCausalLM.from_pretrained`` loads the result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from ..errors import ForgetfulError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


@dataclass(frozen=True)
class TinyConfig:
    """A decoder trained from scratch with its own BPE tokenizer (tiny-*: sized for a 2-core CPU)."""

    family: str  # "gpt2" | "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 512
    vocab_size: int = 2048


BUILTIN_MODELS: dict[str, TinyConfig] = {
    "tiny-gpt2": TinyConfig("gpt2"),
    "tiny-llama": TinyConfig("llama"),
    # GPT-2-small size (124M with a 50k vocabulary; 92M with the default 8k BPE), for GPUs
    "small-gpt2": TinyConfig("gpt2", hidden_size=768, num_layers=12, num_heads=12, max_positions=1024, vocab_size=8192),
    "small-llama": TinyConfig(
        "llama", hidden_size=768, num_layers=12, num_heads=12, max_positions=2048, vocab_size=8192
    ),
}


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts`` with special tokens
    ``<|pad|>``, ``<|bos|>``, ``<|eos|>``. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ForgetfulError(f"vocab_size must be at least 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [t for t in texts if t]
    if not texts:
        raise ForgetfulError("cannot train a tokenizer on an empty corpus")
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def tiny_config(name: str, tokenizer: PreTrainedTokenizerBase, **overrides) -> GPT2Config | LlamaConfig:
    """The HF config of a built-in tiny model, sized to ``tokenizer``. Dropout is 0 so training
    is deterministic across process counts and exactly resumable."""
    spec = BUILTIN_MODELS[name]
    pick = lambda key, default: overrides.pop(key, None) or default  # noqa: E731  (None = the built-in size)
    hidden = pick("hidden_size", spec.hidden_size)
    layers = pick("num_layers", spec.num_layers)
    heads = pick("num_heads", spec.num_heads)
    positions = pick("max_positions", spec.max_positions)
    if hidden % heads:
        raise ForgetfulError(f"hidden_size {hidden} must be divisible by num_heads {heads}")
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.family == "gpt2":
        cfg = GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
            **overrides,
        )
    else:
        cfg = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=int(hidden * 8 / 3 + 7) // 8 * 8,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=positions,
            tie_word_embeddings=True,
            attention_dropout=0.0,
            **common,
            **overrides,
        )
    cfg._attn_implementation = "sdpa"
    return cfg


def init_builtin_model(
    name: str,
    corpus: Iterable[str],
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **overrides,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh built-in model (initialised with ``seed``) and a BPE tokenizer trained on ``corpus``."""
    tokenizer = train_bpe_tokenizer(corpus, vocab_size or BUILTIN_MODELS[name].vocab_size)
    config = tiny_config(name, tokenizer, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype) if dtype is not None else model, tokenizer
