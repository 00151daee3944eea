"""Loading causal LMs and their tokenizers: local folders and Hub names through the Auto classes
(offline: the local cache only, else one clear line), GGUF files and the built-in real model
(:mod:`~forgetful.models.gguf`), and the built-in configs (:mod:`~forgetful.models.builtin`), which
are initialised here instead of loaded.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import ForgetfulError
from ..hub import cache_only_when_offline, hub_error
from .builtin import BUILTIN_MODELS, init_builtin_model, is_builtin
from .gguf import GGUF_MODELS, converted_folder, is_gguf


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
        names = ", ".join([*BUILTIN_MODELS, *GGUF_MODELS])
        hint = f"built-in models are {names}; or pass a local folder saved with save_pretrained, or a .gguf file"
    else:
        hint = "pass a local folder saved with save_pretrained"
    return hub_error(kind, name, exc, hint)


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

    Built-in names (``tiny-gpt2``, ...): a BPE tokenizer is trained on ``corpus`` and a fresh model
    initialised with ``seed``. Anything else is loaded with the Auto classes from a local folder or
    the Hub (offline: from the cache, else a clear error).
    """
    if is_builtin(name_or_path):
        if corpus is None:
            raise ForgetfulError(f"the built-in model {name_or_path} needs a corpus to train its tokenizer on")
        return init_builtin_model(name_or_path, corpus, vocab_size=vocab_size, seed=seed, dtype=dtype, **tiny_overrides)
    return load_model(name_or_path, dtype=dtype)


def load_model(name_or_path: str, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a folder, the Hub, a ``.gguf`` file or a built-in GGUF
    model (``smollm2-135m``), and check they agree. GGUF models load from their converted copy
    (made on first use), in bf16 on a GPU that supports it and float32 otherwise, unless ``dtype``
    says."""
    if is_gguf(name_or_path):
        return _load_gguf(name_or_path, dtype)
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


def bf16_native(device: torch.device | str | None = None) -> bool:
    """The one bf16 rule: bf16 where it runs natively, a CUDA GPU that supports it (``device``, when
    given, must be that GPU); never on the CPU, where it is slow and float32 costs nothing extra."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def bf16_autocast(device: torch.device | str):
    """A factory of bf16 autocast contexts on ``device`` where :func:`bf16_native`, else None."""
    if not bf16_native(device):
        return None
    kind = torch.device(device).type
    return lambda: torch.autocast(kind, dtype=torch.bfloat16)


def default_dtype() -> torch.dtype:
    """bf16 on a GPU that supports it, float32 otherwise."""
    return torch.bfloat16 if bf16_native() else torch.float32


def _load_gguf(name_or_path: str, dtype: torch.dtype | None):
    folder = converted_folder(name_or_path)
    try:
        return load_model(str(folder), dtype or default_dtype())
    except ForgetfulError:
        # the copy's files have their recorded sizes but do not load: rebuild it once
        shutil.rmtree(folder, ignore_errors=True)
        return load_model(str(converted_folder(name_or_path)), dtype or default_dtype())


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
