"""Attention-score selection (SnapKV, H2O): keep the context tokens that the end of the context
attends to most.

One forward pass of a causal LM over the context. In each chosen layer, the queries of the last
``window`` tokens (the observation window: in a question-answering prompt, the question) attend
over the context; each token's score is the attention it receives, summed over heads, over the
window's queries and over the layers. ``window >= n`` sums over every query: H2O's cumulative
attention. SnapKV smooths the scores by pooling over neighbouring tokens (``pool``) and keeps its
observation window (``keep_window``). The top ``b`` are kept.

The scores are taken inside the attention computation through an attention implementation of our
own (registered with transformers): it computes the usual SDPA output and, for the window's queries
only, the softmax over the keys. So the scorer never materialises ``n x n`` attention matrices, and
only the layers up to the last chosen one run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ForgetfulError
from ...models.layers import decoder_stack, first_layers, num_layers
from ...nll import attention_implementation, unwrap_model
from .base import ForgetMask, attention_or_ones, query_mask, register_mask

ATTENTION_SCORES = "forgetful_attention_scores"


class _Recorder:
    """The attention received by every key from the query tokens, accumulated over layers."""

    def __init__(self, query_positions: torch.Tensor, valid_queries: torch.Tensor, layers: set[int], width: int):
        self.layers = layers
        self.valid_queries = valid_queries  # [B, Q]
        self.query_positions = query_positions  # [B, Q]
        keys = torch.arange(width, device=query_positions.device)
        # a query at position q sees keys 0..q of its own row
        self.visible = keys.view(1, 1, -1) <= query_positions.unsqueeze(-1)
        self.scores = torch.zeros(query_positions.shape[0], width, device=query_positions.device)

    @classmethod
    def for_query(cls, query: torch.Tensor, layers: set[int]) -> _Recorder:
        """Queries where ``query`` ([B, n] bool) is true, in order (one read-back: their count)."""
        count = query.sum(-1)
        width = max(int(count.max()), 1)
        positions = torch.argsort((~query).to(torch.uint8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=query.device).unsqueeze(0) < count.unsqueeze(1)
        return cls(positions, valid, layers, query.shape[1])

    def add(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        b, heads, _, dim = query.shape
        w = self.query_positions.shape[1]
        q = query.gather(2, self.query_positions.view(b, 1, w, 1).expand(b, heads, w, dim)).float()
        k = key.float().repeat_interleave(heads // key.shape[1], dim=1)  # grouped-query attention
        logits = (q @ k.transpose(-1, -2)) * scaling  # [B, H, w, n]
        logits = logits.masked_fill(~self.visible.unsqueeze(1), float("-inf"))
        probs = torch.softmax(logits, dim=-1) * self.valid_queries.view(b, 1, w, 1)
        self.scores += probs.sum(dim=(1, 2))


_ACTIVE: list[_Recorder] = []


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = _ACTIVE[-1] if _ACTIVE else None
    if recorder is not None and getattr(module, "layer_idx", None) in recorder.layers:
        scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        recorder.add(module, query, key, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_SCORES, _recording_attention)


_register()


@contextlib.contextmanager
def _recording(recorder: _Recorder) -> Iterator[_Recorder]:
    _ACTIVE.append(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.pop()


def _window(attn: torch.Tensor, window: int) -> torch.Tensor:
    pos = torch.arange(attn.shape[1], device=attn.device).unsqueeze(0)
    return (pos >= attn.sum(-1, keepdim=True) - window) & attn


def _chosen_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    total = num_layers(model)
    chosen = sorted(set(range(total) if layers is None else layers))
    if not chosen or chosen[0] < 0 or chosen[-1] >= total:
        raise ForgetfulError(f"attention-score layers must lie in 0..{total - 1}, got {list(layers or [])}")
    return chosen


@torch.no_grad()
def attention_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    window: int = 32,
    layers: Sequence[int] | None = None,
    query: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, n]``: the attention each token receives from the query tokens of its row, summed over
    heads, queries and ``layers`` (default: all). The query is ``query`` ([B, n] bool) or the last
    ``window`` real tokens of each row. Rows are right-padded."""
    chosen = _chosen_layers(model, layers)
    if window < 1:
        raise ForgetfulError(f"the observation window must hold at least one token, got {window}")
    attn = attention_mask.bool()
    recorder = _Recorder.for_query(_window(attn, window) if query is None else query.bool() & attn, set(chosen))
    with (
        _recording(recorder),
        attention_implementation(model, ATTENTION_SCORES),
        first_layers(model, chosen[-1] + 1) as base,
    ):
        base(input_ids=input_ids, attention_mask=attn.long(), use_cache=False)
    return recorder.scores


@torch.no_grad()
def early_features(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward through the first ``layer`` decoder layers only: the hidden states there
    ``[B, n, d]`` (before the final norm) and the attention each token receives from the ``query``
    tokens in those layers ``[B, n]`` (summed over heads, queries and layers)."""
    attn = attention_mask.bool()
    recorder = _Recorder.for_query(query.bool() & attn, set(range(layer)))
    captured = {}

    def grab(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    with _recording(recorder), attention_implementation(model, ATTENTION_SCORES), first_layers(model, layer) as base:
        handle = getattr(base, decoder_stack(model)[1])[layer - 1].register_forward_hook(grab)
        try:
            base(input_ids=input_ids, attention_mask=attn.long(), use_cache=False)
        finally:
            handle.remove()
    return captured["h"], recorder.scores


@register_mask("attention_score")
class AttentionScoreMask(ForgetMask):
    """Keep the tokens the query attends to most (SnapKV): the attention from the query tokens
    (the protected question after a passage, else the last ``window`` tokens, the observation
    window), summed over heads and ``layers`` (default all), smoothed by ``pooling`` (``avg``, as
    SnapKV, or ``max``) over ``pool`` neighbours (odd; 0 or 1: none), the window itself kept first
    (``keep_window``). Costs one forward of the scoring LM through the last chosen layer."""

    name = "attention_score"

    def __init__(
        self,
        scorer_model: nn.Module,
        window: int = 32,
        layers: Sequence[int] | None = None,
        pool: int = 5,
        pooling: str = "avg",
        keep_window: bool = True,
    ):
        super().__init__()
        if pool < 0 or (pool > 1 and pool % 2 == 0):
            raise ForgetfulError(f"pool must be 0, 1 or an odd width, got {pool}")
        if pooling not in ("avg", "max"):
            raise ForgetfulError(f"pooling must be avg or max, got '{pooling}'")
        object.__setattr__(self, "_scorer", scorer_model)  # not a submodule: never trained or saved
        self.window, self.layers, self.pool, self.pooling, self.keep_window = window, layers, pool, pooling, keep_window

    @classmethod
    def create(cls, model=None, *, seed=0, device="cpu", **options):
        if model is None:
            raise ForgetfulError("the attention_score baseline needs a causal LM to score tokens with")
        return cls(model, **options)

    @torch.no_grad()
    def keep_logits(self, input_ids, attention_mask=None, *, protect=None, units=None):
        attn = attention_or_ones(input_ids, attention_mask)
        query = query_mask(attn, protect, self.window)
        scores = attention_scores(self._scorer, input_ids, attn, window=self.window, layers=self.layers, query=query)
        if self.pool > 1:
            pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
            kwargs = {"count_include_pad": False} if self.pooling == "avg" else {}
            scores = pool(scores.unsqueeze(1), self.pool, stride=1, padding=self.pool // 2, **kwargs).squeeze(1)
        if self.keep_window:
            scores = scores + query.float() * 1e4
        return scores.masked_fill(~attn, float("-inf"))

    def extra_flops_per_token(self, context_length: int) -> float:
        from ..flops import forward_flops

        config = unwrap_model(self._scorer).config
        used = (max(self.layers) + 1 if self.layers else num_layers(self._scorer)) / num_layers(self._scorer)
        # the decoder layers it runs (no LM head), and the window's attention scores (small)
        body = forward_flops(config, context_length, logit_positions=0) * used
        return body / max(context_length, 1)

    def scorer_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else num_layers(self._scorer)


def _layer_count(model: nn.Module, layer: int | None, default: int, what: str) -> int:
    total = num_layers(model)
    layer = min(default, total) if layer is None else layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= total:
        raise ForgetfulError(f"{what}: layer must lie in 1..{total} (this model's layers), got {layer!r}")
    return layer


@register_mask("snapkv")
class SnapKVMask(AttentionScoreMask):
    """SnapKV (Li et al. 2024) as one selection for the whole model, at a depth: the attention the
    question (the protected tokens after the passage, else the last ``window`` tokens, SnapKV's
    observation window) pays each token, summed over heads and over the first ``layer`` layers
    (default: all), average-pooled over ``pool`` neighbours (5, kvpress's kernel), the window kept
    first. ``layer=L`` runs L layers: the compute-matched peer of a policy that reads L layers."""

    name = "snapkv"

    def __init__(self, scorer_model: nn.Module, layer: int | None = None, window: int = 32, pool: int = 5):
        layer = _layer_count(scorer_model, layer, num_layers(scorer_model), "snapkv")
        super().__init__(scorer_model, window=window, layers=list(range(layer)), pool=pool)
        self.layer = layer


@register_mask("gemfilter")
class GemFilterMask(AttentionScoreMask):
    """GemFilter (Shi et al. 2024): the attention of the query - the question where the row has one,
    else its last ``window`` tokens (GemFilter reads the last token) - at ONE early layer, the
    ``layer``-th (default 12, GemFilter's depth for 32-layer models, or the model's last), summed
    over heads; no pooling; the top-k kept in reading order. Runs ``layer`` layers."""

    name = "gemfilter"

    def __init__(self, scorer_model: nn.Module, layer: int | None = None, window: int = 1, pool: int = 0):
        layer = _layer_count(scorer_model, layer, 12, "gemfilter")
        super().__init__(scorer_model, window=window, layers=[layer - 1], pool=pool)
        self.layer = layer
