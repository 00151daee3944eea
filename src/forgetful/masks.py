"""Forget-mask policies: which context tokens to keep.

Every policy gives one keep-logit per context token (higher = keep) and shares one interface:

* ``keep_logits(input_ids, attention_mask)`` -> ``[B, n]`` float32;
* ``sample(input_ids, attention_mask, forget_p=..., mode="exact"|"bernoulli", num_samples=K)`` ->
  :class:`~forgetful.compression.KeepSample` (keep masks ``[K, B, n]``, log-probabilities
  ``[K, B]``, entropy). Exact mode keeps exactly ``b = round((1 - forget_p) * n)`` tokens by
  Gumbel-top-k with the Plackett-Luce log-probability; Bernoulli mode keeps each token with
  probability sigmoid(logit);
* ``greedy(input_ids, attention_mask, forget_p=...)`` -> the top-``b`` keep mask.

Token 0 (the attention sink) is kept unless ``keep_first=False``; padding is never kept.

Not learned: :class:`IdentityMask` (keep all), :class:`RandomForgetMask`, :class:`RecencyMask`
(keep the last ``b``) and :class:`SelfInformationMask` (keep the tokens the LM finds least
predictable, as in Selective Context). Learned, reading the base model's input embeddings
(detached; the policy has its own parameters) plus a learned embedding of the distance to the end
of the context: :class:`MLPForgetMask`, :class:`CNNMLPForgetMask`, :class:`RNNForgetMask`. They
save and load like PEFT adapters: ``save_pretrained(dir)`` writes ``config.json`` and
``model.safetensors`` (without the base model's embeddings); ``from_pretrained(dir, base)``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .compression import (
    KeepSample,
    _eligible,
    bernoulli_keep,
    gumbel_topk_keep,
    kept_counts,
    topk_keep,
)
from .errors import ForgetfulError, check_probability
from .token_loss import unwrap_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODES = ("exact", "bernoulli")
_UMASK = os.umask(0)
os.umask(_UMASK)


def _default_attention(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.dim() != 2:
        raise ForgetfulError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ForgetfulError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    return attention_mask.bool()


class ForgetMask(nn.Module):
    """Base class: subclasses implement :meth:`keep_logits`."""

    learned: ClassVar[bool] = False
    #: whether ``greedy`` ignores the budget and keeps every token (the identity)
    keeps_everything: ClassVar[bool] = False
    name: ClassVar[str] = "mask"

    def keep_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.keep_logits(input_ids, attention_mask)

    def _budget(self, attention_mask, forget_p, budget, keep_first):
        if forget_p is None and budget is None:
            forget_p = getattr(self, "forget_prob", None)
        return kept_counts(attention_mask.sum(-1), forget_p=forget_p, budget=budget, keep_first=keep_first)

    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        forget_p: float | None = None,
        budget: int | torch.Tensor | None = None,
        mode: str = "exact",
        num_samples: int = 1,
        keep_first: bool = True,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> KeepSample:
        """Sample keep masks (``[num_samples, B, n]``) with their log-probabilities. ``exact``:
        the budget from ``forget_p``/``budget``; ``bernoulli``: each token kept with
        ``sigmoid(logit)``, so the budget holds only in expectation (the trainer's penalty keeps it
        near ``forget_p``) and ``forget_p`` does not enter the sampling itself."""
        if mode not in MODES:
            raise ForgetfulError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        attn = _default_attention(input_ids, attention_mask)
        eligible, forced = _eligible(attn, keep_first)
        logits = self.keep_logits(input_ids, attn)
        if self.keeps_everything:
            keep = attn.unsqueeze(0).expand(num_samples, *attn.shape)
            zeros = logits.new_zeros(num_samples, attn.shape[0])
            return KeepSample(keep, zeros, zeros[0])
        if mode == "bernoulli":
            return bernoulli_keep(logits, eligible, forced, num_samples, generator, noise)
        k = self._budget(attn, forget_p, budget, keep_first)
        return gumbel_topk_keep(logits, k, eligible, forced, num_samples, generator, noise)

    @torch.no_grad()
    def greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        forget_p: float | None = None,
        budget: int | torch.Tensor | None = None,
        keep_first: bool = True,
    ) -> torch.Tensor:
        """The exact-budget keep mask of the ``b`` highest keep-logits."""
        attn = _default_attention(input_ids, attention_mask)
        if self.keeps_everything:
            return attn.clone()
        eligible, forced = _eligible(attn, keep_first)
        k = self._budget(attn, forget_p, budget, keep_first)
        return topk_keep(self.keep_logits(input_ids, attn), k, eligible, forced)

    def extra_flops_per_token(self, context_length: int) -> float:
        """Forward FLOPs the policy adds per context token (0 for free baselines)."""
        return 0.0


# ------------------------------------------------------------------------------------------
# Baselines that are not learned
# ------------------------------------------------------------------------------------------


class IdentityMask(ForgetMask):
    """Keep every token (the full-context reference)."""

    keeps_everything = True
    name = "identity"

    def keep_logits(self, input_ids, attention_mask=None):
        attn = _default_attention(input_ids, attention_mask)
        return torch.zeros(attn.shape, device=input_ids.device).masked_fill(~attn, float("-inf"))


class NoContextMask(ForgetMask):
    """Forget the whole context except token 0 (the "no context" baseline)."""

    name = "none"

    def keep_logits(self, input_ids, attention_mask=None):
        attn = _default_attention(input_ids, attention_mask)
        return torch.zeros(attn.shape, device=input_ids.device).masked_fill(~attn, float("-inf"))

    def _budget(self, attention_mask, forget_p, budget, keep_first):
        return kept_counts(attention_mask.sum(-1), budget=0, keep_first=keep_first)

    def sample(self, input_ids, attention_mask=None, *, mode="exact", num_samples=1, keep_first=True, **kw):
        if mode not in MODES:
            raise ForgetfulError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        attn = _default_attention(input_ids, attention_mask)
        _, forced = _eligible(attn, keep_first)
        keep = forced.unsqueeze(0).expand(num_samples, *attn.shape)
        zeros = torch.zeros(num_samples, attn.shape[0], device=input_ids.device)
        return KeepSample(keep, zeros, zeros[0])


class RandomForgetMask(ForgetMask):
    """Forget tokens at random: Bernoulli(``forget_prob``) per token in Bernoulli mode, a uniform
    random subset of the exact budget in exact mode and in ``greedy``."""

    name = "random"

    def __init__(self, forget_prob: float = 0.1, generator: torch.Generator | None = None):
        super().__init__()
        self.forget_prob = check_probability("forget_prob", forget_prob)
        self.generator = generator

    def keep_logits(self, input_ids, attention_mask=None):
        attn = _default_attention(input_ids, attention_mask)
        # Random scores: top-k of i.i.d. noise is a uniform random subset of size k.
        u = torch.rand(attn.shape, generator=self.generator, device=input_ids.device)
        return u.masked_fill(~attn, float("-inf"))

    def sample(self, input_ids, attention_mask=None, *, forget_p=None, budget=None, mode="exact",
               num_samples=1, keep_first=True, generator=None, noise=None):
        if mode not in MODES:
            raise ForgetfulError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        if mode == "bernoulli":
            p = self.forget_prob if forget_p is None else check_probability("forget_p", forget_p)
            attn = _default_attention(input_ids, attention_mask)
            eligible, forced = _eligible(attn, keep_first)
            logit = math.log(max(1 - p, 1e-12)) - math.log(max(p, 1e-12))
            logits = torch.full(attn.shape, logit, device=input_ids.device)
            return bernoulli_keep(logits, eligible, forced, num_samples, generator or self.generator, noise)
        attn = _default_attention(input_ids, attention_mask)
        eligible, forced = _eligible(attn, keep_first)
        k = self._budget(attn, forget_p, budget, keep_first)
        zeros = torch.zeros(attn.shape, device=input_ids.device)
        return gumbel_topk_keep(zeros, k, eligible, forced, num_samples, generator or self.generator, noise)


class RecencyMask(ForgetMask):
    """Keep the most recent tokens: ``b`` in all, token 0 (when kept first) and the last ``b - 1``."""

    name = "recency"

    def keep_logits(self, input_ids, attention_mask=None):
        attn = _default_attention(input_ids, attention_mask)
        pos = torch.arange(attn.shape[1], device=input_ids.device, dtype=torch.float32).expand(attn.shape)
        return pos.masked_fill(~attn, float("-inf"))


class SelfInformationMask(ForgetMask):
    """Keep the tokens with the highest self-information ``-log p(x_t | x_<t)`` under a causal LM
    (Selective Context, Li et al. 2023). Costs one full forward of the scoring LM."""

    name = "self_information"

    def __init__(self, scorer_model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_scorer", scorer_model)  # not a submodule: never trained or saved

    @torch.no_grad()
    def keep_logits(self, input_ids, attention_mask=None):
        attn = _default_attention(input_ids, attention_mask)
        logits = self._scorer(input_ids=input_ids, attention_mask=attn.long(), use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        surprisal = torch.cat([torch.full_like(logp[:, :1], 1e4), -logp], dim=1)
        return surprisal.masked_fill(~attn, float("-inf"))

    def extra_flops_per_token(self, context_length: int) -> float:
        from .flops import forward_flops_per_token

        return forward_flops_per_token(unwrap_model(self._scorer).config, context_length)


# ------------------------------------------------------------------------------------------
# Learned policies
# ------------------------------------------------------------------------------------------


def distance_buckets(distance: torch.Tensor, num_buckets: int = 32, max_distance: int = 4096) -> torch.Tensor:
    """Bucket a distance: exact below ``num_buckets // 2``, then logarithmic up to ``max_distance``
    (as T5's relative positions), so a policy trained on short contexts extends to long ones."""
    exact = num_buckets // 2
    d = distance.clamp(min=0)
    log_ratio = torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).long()
    return torch.where(d < exact, d, large.clamp(max=num_buckets - 1))


POLICIES: dict[str, type[LearnedForgetMask]] = {}


class LearnedForgetMask(ForgetMask):
    """A trainable policy over the base model's (detached) input embeddings."""

    learned = True

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        POLICIES[cls.__name__] = cls

    def __init__(self, base_llm_model: nn.Module | None = None, *, hidden_size: int = 128,
                 num_distance_buckets: int = 32, max_distance: int = 4096, embed_dim: int | None = None):
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
            "policy_class": type(self).__name__,
            "embed_dim": self.embed_dim,
            "hidden_size": self.hidden_size,
            "num_distance_buckets": self.num_distance_buckets,
            "max_distance": self.max_distance,
            **self._extra_config(),
        }

    def _extra_config(self) -> dict:
        return {}

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
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token features ``[B, n, hidden]``: projected embeddings + distance to the end."""
        if self._embeddings is None:
            raise ForgetfulError("the policy has no base model: call policy.attach(model) first")
        with torch.no_grad():
            emb = self._embeddings(input_ids)
        emb = emb.detach().to(self.proj.weight.dtype)
        lengths = attention_mask.sum(-1, keepdim=True)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        dist = distance_buckets(lengths - 1 - pos, self.num_distance_buckets, self.max_distance)
        return self.proj(self.norm(emb)) + self.distance(dist)

    def keep_logits(self, input_ids, attention_mask=None):
        attn = _default_attention(input_ids, attention_mask)
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
        """Write ``config.json`` and ``model.safetensors`` (the policy's own weights only)."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        for name, write in ((WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"})),
                            (CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(self.config(), indent=2) + "\n"))):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
            os.close(fd)
            try:
                write(tmp)
                os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
                os.replace(tmp, out / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base_llm_model: nn.Module | None = None) -> LearnedForgetMask:
        """Rebuild a saved policy; ``cls`` may be the base class (the saved class is used)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise ForgetfulError(f"{d} is not a saved policy: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ForgetfulError(f"{cfg_path} is not valid JSON (a corrupt policy folder?)") from None
        if not isinstance(cfg, dict):
            raise ForgetfulError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
        name = cfg.pop("policy_class", None)
        if name not in POLICIES:
            raise ForgetfulError(f"{cfg_path}: unknown policy_class {name!r}; known: {', '.join(POLICIES)}")
        policy_cls = POLICIES[name]
        if cls is not LearnedForgetMask and not issubclass(policy_cls, cls):
            raise ForgetfulError(f"{d} holds a {name}, not a {cls.__name__}")
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
            raise ForgetfulError(f"{w_path} does not match {name} as configured in {cfg_path}: {exc}") from None
        if missing or unexpected:
            raise ForgetfulError(f"{w_path} does not match {name}: missing {missing}, unexpected {unexpected}")
        return policy


class MLPForgetMask(LearnedForgetMask):
    """Each token on its own: features -> MLP -> keep-logit."""

    name = "mlp"

    def __init__(self, base_llm_model=None, **kw):
        super().__init__(base_llm_model, **kw)
        h = self.hidden_size
        self.head = nn.Sequential(nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))

    def score(self, h, attention_mask):
        return self.head(h).squeeze(-1)


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
            packed = nn.utils.rnn.pack_padded_sequence(h, lengths.clamp(min=1).cpu(), batch_first=True,
                                                       enforce_sorted=False)
            out, _ = self.rnn(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=h.shape[1])
        return self.head(out).squeeze(-1)


MASK_TYPES = {"mlp": MLPForgetMask, "cnn_mlp": CNNMLPForgetMask, "rnn": RNNForgetMask, "birnn": RNNForgetMask}


def build_policy(kind: str, base_llm_model: nn.Module, **kw) -> LearnedForgetMask:
    """A learned policy by CLI name: mlp, cnn_mlp, rnn, birnn."""
    if kind not in MASK_TYPES:
        raise ForgetfulError(f"unknown mask '{kind}'; choose from {', '.join(MASK_TYPES)}")
    if kind == "birnn":
        kw["bidirectional"] = True
    return MASK_TYPES[kind](base_llm_model, **kw)
