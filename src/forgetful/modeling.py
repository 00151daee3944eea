"""Tokenizer and model factory.

Any Hub name or local folder goes through the Auto classes. Two built-in configs, ``tiny-gpt2``
and ``tiny-llama``, are initialised locally with a byte-level BPE tokenizer trained with
``tokenizers`` on the chosen corpus and saved as a normal HF tokenizer, so everything runs
offline and ``AutoModelForCausalLM.from_pretrained`` loads the result.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .errors import ForgetfulError
from .hub import cache_only_when_offline, hub_error

logger = logging.getLogger(__name__)

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
    "small-gpt2": TinyConfig("gpt2", hidden_size=768, num_layers=12, num_heads=12, max_positions=1024,
                             vocab_size=8192),
    "small-llama": TinyConfig("llama", hidden_size=768, num_layers=12, num_heads=12, max_positions=2048,
                              vocab_size=8192),
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


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder or the Hub, with a pad token (EOS when it has none)."""
    try:
        with cache_only_when_offline():
            tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise _load_error("tokenizer", name_or_path, exc) from None
    return ensure_pad_token(tok)


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ForgetfulError("the tokenizer has neither a pad nor an EOS token; add one before training")
        tok.pad_token = tok.eos_token
    return tok


def _load_error(kind: str, name: str, exc: BaseException) -> ForgetfulError:
    if Path(name).exists():
        return ForgetfulError(f"cannot load {kind} from {name}: {str(exc).strip().splitlines()[0]}")
    if "/" not in name and name not in BUILTIN_MODELS and not Path(name).exists():
        hint = f"built-in models are {', '.join(BUILTIN_MODELS)}; or pass a local folder saved with save_pretrained"
    else:
        hint = "pass a local folder saved with save_pretrained"
    return hub_error(kind, name, exc, hint)


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
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.family == "gpt2":
        cfg = GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common, **overrides,
        )
    else:
        cfg = LlamaConfig(
            hidden_size=hidden, intermediate_size=int(hidden * 8 / 3 + 7) // 8 * 8, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=positions,
            tie_word_embeddings=True, attention_dropout=0.0, **common, **overrides,
        )
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(
    name_or_path: str,
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **tiny_overrides,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer.

    ``tiny-gpt2`` / ``tiny-llama``: a BPE tokenizer is trained on ``corpus`` and a fresh model
    initialised with ``seed``. Anything else is loaded with the Auto classes from a local folder or
    the Hub (offline: from the cache, else a clear error).
    """
    if is_builtin(name_or_path):
        if corpus is None:
            raise ForgetfulError(f"the built-in model {name_or_path} needs a corpus to train its tokenizer on")
        tokenizer = train_bpe_tokenizer(corpus, vocab_size or BUILTIN_MODELS[name_or_path].vocab_size)
        config = tiny_config(name_or_path, tokenizer, **tiny_overrides)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        return model.to(dtype) if dtype is not None else model, tokenizer
    return load_model(name_or_path, dtype=dtype)


def load_model(name_or_path: str, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a folder or the Hub, and check they agree."""
    p = Path(name_or_path)
    if p.exists() and p.is_dir() and not (p / "config.json").exists():
        raise ForgetfulError(f"{p} is not a saved model: it has no config.json (save it with save_pretrained)")
    try:
        with cache_only_when_offline():
            config = AutoConfig.from_pretrained(name_or_path)
            if getattr(config, "_attn_implementation", None) is None:
                config._attn_implementation = "sdpa"
            model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise _load_error("model", name_or_path, exc) from None
    tokenizer = load_tokenizer(name_or_path)
    check_vocab(model, tokenizer)
    return model, tokenizer


def check_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokenizer must not produce ids outside the model's embedding table."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ForgetfulError(
            f"tokenizer/model vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens but the model's "
            f"embedding table has {rows} rows; use the tokenizer saved with this model"
        )


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
