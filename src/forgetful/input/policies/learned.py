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
from .base import MASKS, ForgetMask, attention_or_ones, query_mask, register_mask

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

    def extra_flops_per_token(self, context_length: int) -> float:
        from ..flops import forward_flops

        base = unwrap_model(self._base)
        body = forward_flops(base.config, context_length, logit_positions=0) * self.layer / num_layers(base)
        return body / max(context_length, 1) + super().extra_flops_per_token(context_length)


def standardise(scores: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """Per row, ``(score - mean) / std`` over the tokens in ``among``, bounded to [-50, 50] (a
    kept-first token scores ~1e4 raw and stays on top); 0 where a score is not finite. Monotone in
    the score, so it keeps every ranking among the tokens it does not bound."""
    finite = torch.isfinite(scores)
    w = (among & finite).float()
    x = torch.where(finite, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
    n = w.sum(-1, keepdim=True).clamp(min=1)
    mean = (x * w).sum(-1, keepdim=True) / n
    std = (((x - mean) ** 2 * w).sum(-1, keepdim=True) / n).sqrt().clamp(min=1e-3)
    return torch.where(finite, ((x - mean) / std).clamp(-50, 50), torch.zeros_like(x))


# prior scorers a residual policy can start from: baselines that rank tokens by a score
PRIORS = ("recency", "lexical", "attention_score", "self_information")


@register_mask("residual")
class ResidualForgetMask(LearnedForgetMask):
    """A learned correction over a prior, keeping whole units, reading the question.

    ``logit = prior_scale * exp(s) * standardise(prior) + correction``, where ``prior`` is a
    registered baseline's score (``recency``, ``lexical``, ``attention_score``,
    ``self_information``), ``s`` a learned log-scale (0 at first) and the correction an MLP whose
    last layer starts at zero: an untrained policy ranks exactly as its prior does, so training can
    only start from the best heuristic. It keeps ``unit``\\ s (``sentence``, ``task``, ``chunk:N`` or
    ``token``; a unit's logit is its tokens' mean).

    What the correction reads, per token: the base LM's hidden state after its first ``layer``
    layers (default 4, or all of a shallower model; one truncated forward over the whole row,
    question included; ``layer=0``: the input embeddings), the token's distance to the end, the standardised scores of the cheap priors
    (recency, lexical overlap, the attention the question pays the token in those early layers) and
    of the chosen prior, and a cross-attention from the token to the question's tokens at that layer
    (the question: the protected part of the row after the passage, else the last ``window``
    tokens). Token features are also averaged over the token's unit, so a unit is judged as a whole.
    """

    name = "residual"
    N_SCALARS = 4

    def __init__(
        self,
        base_llm_model=None,
        prior: str = "lexical",
        unit: str = "sentence",
        layer: int | None = None,
        window: int = 32,
        prior_scale: float = 2.0,
        **kw,
    ):
        super().__init__(base_llm_model, **kw)
        if prior not in PRIORS:
            raise ForgetfulError(f"prior must be one of {', '.join(PRIORS)}, got '{prior}'")
        if layer is None:  # the default: 4 layers, or every layer of a shallower model
            layer = min(4, num_layers(base_llm_model)) if base_llm_model is not None else 4
        if layer < 0 or window < 1:
            raise ForgetfulError(f"layer must be >= 0 and window >= 1, got layer={layer}, window={window}")
        if base_llm_model is not None and layer > num_layers(base_llm_model):
            raise ForgetfulError(f"layer {layer} is past the model's {num_layers(base_llm_model)} layers")
        if prior_scale <= 0:
            raise ForgetfulError(f"prior_scale must be positive, got {prior_scale}")
        self.prior, self.layer, self.window, self.prior_scale = prior, layer, window, float(prior_scale)
        self.with_unit(unit)
        h = self.hidden_size
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.scalars = nn.Linear(self.N_SCALARS, h)
        self.query_proj, self.key_proj, self.value_proj = (nn.Linear(h, h) for _ in range(3))
        self.head = nn.Sequential(nn.Linear(6 * h, h), nn.GELU(), nn.Linear(h, 1))
        nn.init.zeros_(self.head[-1].weight)  # the correction starts at exactly 0
        nn.init.zeros_(self.head[-1].bias)
        self._attach_base(base_llm_model)

    def _attach_base(self, base_llm_model) -> None:
        from .base import build_mask

        object.__setattr__(self, "_base", base_llm_model)  # not a submodule: not trained, not saved
        scorer = None
        if base_llm_model is not None or self.prior in ("recency", "lexical"):
            scorer = (
                build_mask(self.prior, base_llm_model, learned=False, window=self.window)
                if self.prior in ("lexical", "attention_score")
                else build_mask(self.prior, base_llm_model, learned=False)
            )
        object.__setattr__(self, "_prior", scorer)

    def _extra_config(self):
        return {
            "prior": self.prior,
            "unit": self.unit,
            "layer": self.layer,
            "window": self.window,
            "prior_scale": self.prior_scale,
        }

    def attach(self, base_llm_model: nn.Module) -> LearnedForgetMask:
        super().attach(base_llm_model)
        self._attach_base(base_llm_model)
        return self

    def prior_logits(self, input_ids, attn, protect=None, units=None) -> torch.Tensor:
        """What the policy equals before training: ``prior_scale * standardise(prior)``."""
        query = query_mask(attn, protect, self.window)
        return self.prior_scale * self._standardised_prior(input_ids, attn, protect, query)

    def _candidates(self, attn, protect, query) -> torch.Tensor:
        pos = torch.arange(attn.shape[1], device=attn.device).unsqueeze(0)
        cand = attn & ~query & (pos > 0)
        return cand if protect is None else cand & ~protect.bool()

    @torch.no_grad()
    def _standardised_prior(self, input_ids, attn, protect, query) -> torch.Tensor:
        if self._prior is None:
            raise ForgetfulError("the policy has no base model: call policy.attach(model) first")
        raw = self._prior.keep_logits(input_ids, attn, protect=protect)
        return standardise(raw, self._candidates(attn, protect, query))

    @torch.no_grad()
    def _inputs(self, input_ids, attn, protect, query):
        """Detached per-token inputs: hidden states ``[B, n, d]``, scalar features ``[B, n, 4]`` and
        the standardised prior ``[B, n]``."""
        from .attention import early_features
        from .baselines import lexical_scores

        if self._base is None or self._embeddings is None:
            raise ForgetfulError("the policy has no base model: call policy.attach(model) first")
        if self.layer == 0:
            hidden = self._embeddings(input_ids)
            attended = torch.zeros(attn.shape, device=input_ids.device)
        else:
            hidden, attended = early_features(self._base, input_ids, attn, self.layer, query)
        cand = self._candidates(attn, protect, query)
        pos = torch.arange(attn.shape[1], device=attn.device, dtype=torch.float32).expand(attn.shape)
        prior = self._standardised_prior(input_ids, attn, protect, query)
        scalars = torch.stack(
            [
                prior,
                standardise(lexical_scores(input_ids, attn, query), cand),
                standardise(torch.log1p(attended.float()), cand),
                standardise(pos, cand),
            ],
            dim=-1,
        ).clamp(-10, 10)  # a kept-first query token scores ~1e4 raw: bounded features
        return hidden, scalars, prior

    def keep_logits(self, input_ids, attention_mask=None, *, protect=None, units=None):
        attn = attention_or_ones(input_ids, attention_mask)
        query = query_mask(attn, protect, self.window)
        hidden, scalars, prior = self._inputs(input_ids, attn, protect, query)
        dtype = self.proj.weight.dtype
        lengths = attn.sum(-1, keepdim=True)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        dist = distance_buckets(lengths - 1 - pos, self.num_distance_buckets, self.max_distance)
        x = self.proj(self.norm(hidden.to(dtype))) + self.distance(dist) + self.scalars(scalars.to(dtype))
        x = x * attn.unsqueeze(-1).to(x.dtype)  # padding carries nothing
        asked = _cross_attend(self.query_proj(x), self.key_proj(x), self.value_proj(x), query, self.hidden_size)
        feats = torch.cat([x, asked, x * asked], dim=-1)
        eligible = attn & ~query
        unit_of = self._units(units, attn)
        pooled = feats if unit_of is None else _unit_mean(feats, unit_of, eligible)
        correction = self.head(torch.cat([feats, pooled], dim=-1)).squeeze(-1).float()
        scale = self.prior_scale * torch.exp(self.log_scale.float())
        logits = scale * prior + correction
        return logits.masked_fill(~attn, float("-inf"))

    def extra_flops_per_token(self, context_length: int) -> float:
        from ..flops import forward_flops

        own = 2.0 * sum(p.numel() for n, p in self.named_parameters() if not n.startswith("distance."))
        own += 6.0 * self.hidden_size * min(self.window, context_length)  # the cross-attention
        body = 0.0
        if self.layer and self._base is not None:
            base = unwrap_model(self._base)
            body = forward_flops(base.config, context_length, logit_positions=0) * self.layer / num_layers(base)
            body /= max(context_length, 1)
        prior = self._prior.extra_flops_per_token(context_length) if self._prior is not None else 0.0
        return own + body + prior


def _cross_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query: torch.Tensor, dim: int) -> torch.Tensor:
    """Every token attends over its row's query tokens only (one head): ``[B, n, h]``. The query
    tokens are gathered first (one read-back: their largest count), so this costs ``n x Q``."""
    count = query.sum(-1)
    width = max(int(count.max()), 1)
    at = torch.argsort((~query).to(torch.uint8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=query.device).unsqueeze(0) < count.unsqueeze(1)
    keys = k.gather(1, at.unsqueeze(-1).expand(-1, -1, k.shape[-1]))
    values = v.gather(1, at.unsqueeze(-1).expand(-1, -1, v.shape[-1]))
    scores = (q @ keys.transpose(1, 2)) / math.sqrt(dim)
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(v.dtype)  # a row without query: zeros
    return weights @ values


def _unit_mean(feats: torch.Tensor, units: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Each token's features replaced by the mean over the eligible tokens of its unit (tokens in
    no unit keep their own)."""
    inside = eligible & (units >= 0)
    slots = torch.where(inside, units, torch.zeros_like(units)).unsqueeze(-1).expand_as(feats)
    w = inside.unsqueeze(-1).to(feats.dtype)
    sums = torch.zeros_like(feats).scatter_add(1, slots, feats * w)
    counts = torch.zeros_like(feats[..., :1]).scatter_add(1, slots[..., :1], w)
    mean = (sums / counts.clamp(min=1)).gather(1, slots)
    return torch.where(inside.unsqueeze(-1), mean, feats)
