"""Learned policies. Each reads the base model's input embeddings (detached; the policy has its
own parameters) plus a learned embedding of the token's distance to the end of the context, so it
can learn recency as well as content: :class:`MLPForgetMask` (each token on its own),
:class:`CNNMLPForgetMask` (a convolution over neighbours), :class:`RNNForgetMask` (GRU or LSTM, uni-
or bidirectional). :class:`HiddenStateForgetMask` reads the LM's hidden states at an early layer
instead of its embeddings, so it can score a token against the question that follows.

They save and load like PEFT adapters: ``save_pretrained(dir)`` writes ``policy_config.json`` and
``policy.safetensors`` (the policy's own weights, without the base model's embeddings), names that
cannot be mistaken for a model folder's; ``from_pretrained(dir, base_model)`` rebuilds the policy.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...atomic import atomic_file, write_text_atomic
from ...errors import ForgetfulError
from ...models.layers import early_hidden_states, num_layers
from ...nll import unwrap_model
from .base import MASKS, ForgetMask, attention_or_ones, register_mask

CONFIG_NAME = "policy_config.json"
WEIGHTS_NAME = "policy.safetensors"
# what policy folders were called before (they looked like model folders)
_OLD_NAMES = ("config.json", "model.safetensors")


def distance_buckets(distance: torch.Tensor, num_buckets: int = 32, max_distance: int = 4096) -> torch.Tensor:
    """Bucket a distance: exact below ``num_buckets // 2``, then logarithmic up to ``max_distance``
    (as T5's relative positions), so a policy trained on short contexts extends to long ones."""
    exact = num_buckets // 2
    d = distance.clamp(min=0)
    log_ratio = torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).long()
    return torch.where(d < exact, d, large.clamp(max=num_buckets - 1))


class LearnedForgetMask(ForgetMask):
    """A trainable policy over the base model's (detached) input embeddings."""

    learned = True

    def __init__(
        self,
        base_llm_model: nn.Module | None = None,
        *,
        hidden_size: int = 128,
        num_distance_buckets: int = 32,
        max_distance: int = 4096,
        embed_dim: int | None = None,
    ):
        super().__init__()
        embeddings = None
        if base_llm_model is not None:
            embeddings = unwrap_model(base_llm_model).get_input_embeddings()
            model_dim = embeddings.weight.shape[1]
            if embed_dim is not None and embed_dim != model_dim:
                raise ForgetfulError(
                    f"this policy reads embeddings of size {embed_dim}, but the model's are {model_dim}: "
                    "the policy was trained with another base model"
                )
            embed_dim = model_dim
        if embed_dim is None:
            raise ForgetfulError("a learned policy needs the base model (or embed_dim)")
        if hidden_size < 1:
            raise ForgetfulError(f"hidden_size must be positive, got {hidden_size}")
        object.__setattr__(self, "_embeddings", embeddings)  # not a submodule: not trained, not saved
        self.embed_dim = embed_dim
        self.hidden_size = hidden_size
        self.num_distance_buckets = num_distance_buckets
        self.max_distance = max_distance
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, hidden_size)
        self.distance = nn.Embedding(num_distance_buckets, hidden_size)

    # -- configuration -------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "policy_type": self.name,
            "embed_dim": self.embed_dim,
            "hidden_size": self.hidden_size,
            "num_distance_buckets": self.num_distance_buckets,
            "max_distance": self.max_distance,
            **self._extra_config(),
            **({"forget_layer": self.forget_layer} if self.forget_layer else {}),
        }

    def _extra_config(self) -> dict:
        return {}

    @classmethod
    def create(cls, model=None, *, seed=0, device="cpu", **options):
        return cls(model, **options)

    def attach(self, base_llm_model: nn.Module) -> LearnedForgetMask:
        """Read embeddings from ``base_llm_model`` (e.g. after loading); checks the size."""
        emb = unwrap_model(base_llm_model).get_input_embeddings()
        if emb.weight.shape[1] != self.embed_dim:
            raise ForgetfulError(
                f"this policy reads embeddings of size {self.embed_dim}, but the model's are "
                f"{emb.weight.shape[1]}: the policy was trained with another base model"
            )
        object.__setattr__(self, "_embeddings", emb)
        return self

    # -- features ------------------------------------------------------------------------
    @torch.no_grad()
    def token_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the policy reads of each token ``[B, n, embed_dim]``: the base model's input
        embeddings (the policy never trains them)."""
        if self._embeddings is None:
            raise ForgetfulError("the policy has no base model: call policy.attach(model) first")
        return self._embeddings(input_ids)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token features ``[B, n, hidden]``: the projected token vectors + distance to the end."""
        emb = self.token_vectors(input_ids, attention_mask).detach().to(self.proj.weight.dtype)
        lengths = attention_mask.sum(-1, keepdim=True)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        dist = distance_buckets(lengths - 1 - pos, self.num_distance_buckets, self.max_distance)
        return self.proj(self.norm(emb)) + self.distance(dist)

    def keep_logits(self, input_ids, attention_mask=None, *, protect=None, units=None):
        attn = attention_or_ones(input_ids, attention_mask)
        logits = self.score(self.features(input_ids, attn), attn).float()
        return logits.masked_fill(~attn, float("-inf"))

    def score(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_flops_per_token(self, context_length: int) -> float:
        # every weight is used once per token (2 FLOPs per multiply-add); embeddings are lookups
        dense = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("distance."))
        return 2.0 * dense

    # -- save / load ---------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``policy_config.json`` and ``policy.safetensors`` (the policy's own weights only)."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_file(out / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        write_text_atomic(json.dumps(self.config(), indent=2) + "\n", out / CONFIG_NAME)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, base_llm_model: nn.Module | None = None
    ) -> LearnedForgetMask:
        """Rebuild a saved policy; ``cls`` may be the base class (the saved class is used)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            if _saved_under_old_names(d):
                raise ForgetfulError(
                    f"{d} holds a policy saved under the old file names {' and '.join(_OLD_NAMES)}: rename them "
                    f"to {CONFIG_NAME} and {WEIGHTS_NAME}"
                )
            raise ForgetfulError(f"{d} is not a saved policy: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ForgetfulError(f"{cfg_path} is not valid JSON (a corrupt policy folder?)") from None
        if not isinstance(cfg, dict):
            raise ForgetfulError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
        name = cfg.pop("policy_type", None)
        forget_layer = cfg.pop("forget_layer", 0)
        learned_names = [n for n, spec in MASKS.items() if spec.learned]
        if name not in learned_names:
            raise ForgetfulError(f"{cfg_path}: unknown policy_type {name!r}; known: {', '.join(learned_names)}")
        policy_cls = MASKS[name].cls
        if cls is not LearnedForgetMask and not issubclass(policy_cls, cls):
            raise ForgetfulError(f"{d} holds a {policy_cls.__name__}, not a {cls.__name__}")
        try:
            policy = policy_cls(base_llm_model, **cfg)
        except TypeError as exc:
            raise ForgetfulError(f"{cfg_path}: bad policy config ({exc})") from None
        try:
            state = load_file(str(w_path))
        except (SafetensorError, OSError) as exc:
            raise ForgetfulError(f"cannot read {w_path}: {exc} (a corrupt policy file?)") from None
        try:
            missing, unexpected = policy.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ForgetfulError(
                f"{w_path} does not match {policy_cls.__name__} as configured in {cfg_path}: {exc}"
            ) from None
        if missing or unexpected:
            raise ForgetfulError(
                f"{w_path} does not match {policy_cls.__name__}: missing {missing}, unexpected {unexpected}"
            )
        policy.forget_layer = int(forget_layer)
        return policy


def _saved_under_old_names(folder: Path) -> bool:
    """A policy folder from before the rename: config.json naming a policy class, model.safetensors."""
    config, weights = (folder / name for name in _OLD_NAMES)
    if not (config.is_file() and weights.is_file()):
        return False
    try:
        return "policy_class" in json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


@register_mask("mlp")
class MLPForgetMask(LearnedForgetMask):
    """Each token on its own: features -> MLP -> keep-logit."""

    name = "mlp"

    def __init__(self, base_llm_model=None, **kw):
        super().__init__(base_llm_model, **kw)
        h = self.hidden_size
        self.head = nn.Sequential(nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))

    def score(self, h, attention_mask):
        return self.head(h).squeeze(-1)


@register_mask("cnn_mlp")
class CNNMLPForgetMask(LearnedForgetMask):
    """A 1-D convolution over neighbouring tokens, then an MLP: sees local context."""

    name = "cnn_mlp"

    def __init__(self, base_llm_model=None, kernel_size: int = 5, **kw):
        super().__init__(base_llm_model, **kw)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ForgetfulError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.kernel_size = kernel_size
        h = self.hidden_size
        self.conv = nn.Conv1d(h, h, kernel_size, padding=kernel_size // 2)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))

    def _extra_config(self):
        return {"kernel_size": self.kernel_size}

    def score(self, h, attention_mask):
        h = h * attention_mask.unsqueeze(-1).to(h.dtype)  # padding contributes nothing
        c = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(F.gelu(c) + h).squeeze(-1)


@register_mask("birnn", bidirectional=True)
@register_mask("rnn")
class RNNForgetMask(LearnedForgetMask):
    """A GRU or LSTM over the context, uni- or bidirectional: a unidirectional policy decides from
    the past only; a bidirectional one also sees what comes later (e.g. the question)."""

    name = "rnn"

    def __init__(self, base_llm_model=None, bidirectional: bool = False, cell: str = "gru", **kw):
        super().__init__(base_llm_model, **kw)
        if cell not in ("gru", "lstm"):
            raise ForgetfulError(f"cell must be 'gru' or 'lstm', got '{cell}'")
        self.bidirectional = bool(bidirectional)
        self.cell = cell
        rnn_cls = nn.GRU if cell == "gru" else nn.LSTM
        h = self.hidden_size
        self.rnn = rnn_cls(h, h, batch_first=True, bidirectional=self.bidirectional)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(h * (2 if self.bidirectional else 1), 1))

    def _extra_config(self):
        return {"bidirectional": self.bidirectional, "cell": self.cell}

    def score(self, h, attention_mask):
        lengths = attention_mask.sum(-1)
        if bool((lengths == h.shape[1]).all()) or not self.bidirectional:
            # Right padding never reaches a real token of a forward RNN.
            out, _ = self.rnn(h)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(
                h, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
            )
            out, _ = self.rnn(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=h.shape[1])
        return self.head(out).squeeze(-1)


@register_mask("hidden_state")
class HiddenStateForgetMask(LearnedForgetMask):
    """Reads the base LM's hidden states after its first ``layer`` layers, computed once over the
    whole context (a truncated forward: ``layer`` of the model's layers). Those states are causal: a
    passage token's state has not seen the question after it. So the head compares every token with
    a summary of the last ``window`` tokens (the question, in a question-answering prompt) before
    scoring it, and a token's score can depend on the question."""

    name = "hidden_state"

    def __init__(self, base_llm_model=None, layer: int = 2, window: int = 32, **kw):
        super().__init__(base_llm_model, **kw)
        if layer < 1 or window < 1:
            raise ForgetfulError(f"layer and window must be at least 1, got layer={layer}, window={window}")
        if base_llm_model is not None and layer > num_layers(base_llm_model):
            raise ForgetfulError(f"layer {layer} is past the model's {num_layers(base_llm_model)} layers")
        self.layer, self.window = layer, window
        object.__setattr__(self, "_base", base_llm_model)  # not a submodule: not trained, not saved
        h = self.hidden_size
        self.head = nn.Sequential(nn.GELU(), nn.Linear(2 * h, h), nn.GELU(), nn.Linear(h, 1))

    def _extra_config(self):
        return {"layer": self.layer, "window": self.window}

    def attach(self, base_llm_model: nn.Module) -> LearnedForgetMask:
        super().attach(base_llm_model)
        object.__setattr__(self, "_base", base_llm_model)
        return self

    @torch.no_grad()
    def token_vectors(self, input_ids, attention_mask):
        if self._base is None:
            raise ForgetfulError("the policy has no base model: call policy.attach(model) first")
        return early_hidden_states(self._base, input_ids, attention_mask, self.layer)

    def score(self, h, attention_mask):
        lengths = attention_mask.sum(-1, keepdim=True)
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        window = ((pos >= lengths - self.window) & attention_mask.bool()).unsqueeze(-1).to(h.dtype)
        summary = (h * window).sum(1, keepdim=True) / window.sum(1, keepdim=True).clamp(min=1)
        return self.head(torch.cat([h, h * summary], dim=-1)).squeeze(-1)

    def scorer_layers(self) -> int:
        return self.layer

    def extra_flops_per_token(self, context_length: int) -> float:
        from ..flops import forward_flops

        base = unwrap_model(self._base)
        body = forward_flops(base.config, context_length, logit_positions=0) * self.layer / num_layers(base)
        return body / max(context_length, 1) + super().extra_flops_per_token(context_length)
