"""Compression ops: budgets, keep-mask sampling, and the physical gather that saves compute.

A *keep mask* is a bool tensor shaped like ``input_ids``: True = the token is kept, False = it is
forgotten. Everything here is vectorised over rows and tokens (no Python loops) and runs on any
device.

* :func:`kept_counts` - the exact budget ``b = round(keep_ratio * n)`` per row;
* :func:`create_random_forgetting_mask` - forget each token with probability ``forget_prob``;
* :func:`topk_keep`, :func:`gumbel_topk_keep` - exact-budget masks (greedy / sampled), with the
  Plackett-Luce log-probability of the ordered sample;
* :func:`bernoulli_keep` - keep each token with its own probability, with the log-probability;
* :func:`apply_mask` - gather the kept tokens (in order, original positions), right-padded;
* :func:`compress_examples` - the LM input for (context, target) examples: ``c[K] ++ y`` with
  original position ids and labels on the target only; :func:`compressed_nll` scores it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ForgetfulError, check_probability

# A finite stand-in for -inf in log-probabilities: exp() underflows to exactly 0, and unlike -inf
# it never produces NaN gradients through logcumsumexp / where.
NEG_LARGE = -1e9


def _check_same_shape(input_ids: torch.Tensor, mask: torch.Tensor, name: str = "mask") -> None:
    if input_ids.dim() != 2:
        raise ForgetfulError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if mask.shape != input_ids.shape:
        raise ForgetfulError(f"{name} has shape {tuple(mask.shape)} but input_ids has {tuple(input_ids.shape)}")


def kept_counts(
    lengths: torch.Tensor,
    *,
    keep_ratio: float | None = None,
    budget: int | torch.Tensor | None = None,
    keep_first: bool = True,
) -> torch.Tensor:
    """Tokens to keep per row: ``round(keep_ratio * n)`` or an explicit ``budget``, at least
    one when ``keep_first`` (the first token is always kept), at most ``n``."""
    lengths = lengths.long()
    if budget is not None:
        k = torch.as_tensor(budget, device=lengths.device).long().expand_as(lengths).clone()
        if (k < 0).any():
            raise ForgetfulError(f"budget must be non-negative, got {budget}")
        if (k > lengths).any():
            raise ForgetfulError(
                f"budget {int(k.max())} is larger than the context ({int(lengths.min())} tokens); "
                "use a smaller budget or keep_ratio"
            )
    else:
        if keep_ratio is None:
            raise ForgetfulError("give keep_ratio (share of the context kept) or budget (tokens to keep)")
        check_probability("keep_ratio", keep_ratio, allow_one=True)
        k = torch.floor(keep_ratio * lengths.double() + 0.5 + 1e-9).long()
    floor = (lengths > 0).long() if keep_first else torch.zeros_like(lengths)
    return torch.maximum(torch.minimum(k, lengths), floor)


def eligible_tokens(
    attention_mask: torch.Tensor, keep_first: bool, protect: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens the sampler may choose, tokens forced in). Token 0 is forced when ``keep_first``;
    ``protect`` (e.g. the question after a passage) is always kept."""
    valid = attention_mask.bool()
    forced = torch.zeros_like(valid)
    if keep_first:
        forced[..., 0] = valid[..., 0]
    if protect is not None:
        forced |= protect.bool() & valid
    return valid & ~forced, forced


def budget_counts(
    attention_mask: torch.Tensor,
    *,
    keep_ratio: float | None = None,
    budget: int | torch.Tensor | None = None,
    keep_first: bool = True,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens each row keeps in all: the budget (:func:`kept_counts`) of its compressible tokens, plus
    its protected tokens, which are always kept and not part of the budget."""
    valid = attention_mask.bool()
    if protect is None:
        return kept_counts(valid.sum(-1), keep_ratio=keep_ratio, budget=budget, keep_first=keep_first)
    protected = protect.bool() & valid
    k = kept_counts((valid & ~protected).sum(-1), keep_ratio=keep_ratio, budget=budget, keep_first=keep_first)
    return k + protected.sum(-1)


def create_random_forgetting_mask(
    input_ids: torch.Tensor,
    forget_prob: float,
    *,
    attention_mask: torch.Tensor | None = None,
    keep_first: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep mask that forgets each token independently with probability ``forget_prob``
    (token 0 kept when ``keep_first``; padding never kept)."""
    check_probability("forget_prob", forget_prob)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    _check_same_shape(input_ids, attention_mask, "attention_mask")
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    eligible, forced = eligible_tokens(attention_mask, keep_first)
    return (eligible & (u >= forget_prob)) | forced


def topk_keep(scores: torch.Tensor, k: torch.Tensor, eligible: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Keep the ``k`` highest-scoring tokens per row (``k`` counts forced tokens too)."""
    k_free = free_budget(k, eligible, forced)
    s = scores.float().masked_fill(~eligible, float("-inf"))
    order = s.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(s.shape[-1], device=s.device).expand_as(s)
    chosen = ranks < k_free.unsqueeze(-1)
    return torch.zeros_like(eligible).scatter(-1, order, chosen) | forced


@dataclass
class KeepSample:
    """Sampled keep masks ``[S, B, n]`` and their log-probabilities ``[S, B]`` under the policy."""

    keep: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor  # [B], the policy's entropy (exact mode: of the softmax over tokens)
    expected_keep: torch.Tensor | None = None  # [B], differentiable expected kept count (Bernoulli)


def plackett_luce_log_prob(logits: torch.Tensor, order: torch.Tensor, k_free: torch.Tensor) -> torch.Tensor:
    """Log-probability of drawing the first ``k_free`` items of ``order`` in that order without
    replacement, each with probability softmax(logits over the items not yet drawn).
    ``logits`` use :data:`NEG_LARGE` for items that can never be drawn."""
    s = logits.gather(-1, order)
    # log of the mass still undrawn before step j: logsumexp over order[j:]
    suffix = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    ranks = torch.arange(s.shape[-1], device=s.device)
    step = ranks < k_free.unsqueeze(-1)
    return torch.where(step, s - suffix, torch.zeros_like(s)).sum(-1)


def _sampling_noise(logits: torch.Tensor, num_samples: int, generator, noise):
    """float32 logits, the sample shape ``[S, *logits.shape]`` and uniform noise of that shape
    (drawn here unless given, e.g. to share it across processes)."""
    shape = (num_samples, *logits.shape)
    if noise is None:
        noise = torch.rand(shape, generator=generator, device=logits.device)
    return logits.float(), shape, noise


def free_budget(k: torch.Tensor, eligible: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Tokens each row chooses: its budget ``k`` less its forced tokens, at most its eligible ones."""
    return torch.minimum((k - forced.sum(-1)).clamp(min=0), eligible.sum(-1))


def gumbel_order(
    logits: torch.Tensor,
    drawable: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, finite)``: ``num_samples`` orderings ``[S, ..., n]`` of the drawable items by
    Gumbel-perturbed logits (an ordering drawn from Plackett-Luce over softmax(logits), the items
    that cannot be drawn last), and the logits with :data:`NEG_LARGE` for those items."""
    logits, _, noise = _sampling_noise(logits, num_samples, generator, noise)
    gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-7)))
    finite = logits.masked_fill(~drawable, NEG_LARGE)
    perturbed = (finite.detach() + gumbel).masked_fill(~drawable, float("-inf"))
    return perturbed.argsort(dim=-1, descending=True), finite


def softmax_entropy(finite: torch.Tensor, drawable: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the drawable items (the first draw of Plackett-Luce)."""
    probs = torch.softmax(finite, dim=-1)
    return -(probs * torch.log_softmax(finite, dim=-1)).masked_fill(~drawable, 0.0).sum(-1)


def gumbel_topk_keep(
    logits: torch.Tensor,
    k: torch.Tensor,
    eligible: torch.Tensor,
    forced: torch.Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> KeepSample:
    """Sample ``num_samples`` exact-budget keep sets per row by Gumbel-top-k, which draws
    without replacement from softmax(logits) (Plackett-Luce). ``noise`` (uniform [S, B, n]) may be
    given to share randomness across processes."""
    k_free = free_budget(k, eligible, forced)
    order, finite = gumbel_order(logits, eligible, num_samples, generator, noise)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    chosen = (ranks < k_free.unsqueeze(-1)).expand(order.shape)
    keep = torch.zeros(order.shape, dtype=torch.bool, device=logits.device).scatter(-1, order, chosen) | forced
    log_prob = plackett_luce_log_prob(finite.expand(order.shape), order, k_free)
    return KeepSample(keep, log_prob, softmax_entropy(finite, eligible))


def bernoulli_keep(
    logits: torch.Tensor,
    eligible: torch.Tensor,
    forced: torch.Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> KeepSample:
    """Keep each eligible token with probability sigmoid(logit), independently."""
    logits, shape, noise = _sampling_noise(logits, num_samples, generator, noise)
    p = torch.sigmoid(logits.detach())
    keep = ((noise < p) & eligible) | forced
    logp_keep = torch.nn.functional.logsigmoid(logits)
    logp_drop = torch.nn.functional.logsigmoid(-logits)
    per_token = torch.where(keep, logp_keep, logp_drop).masked_fill(~eligible, 0.0)
    log_prob = per_token.sum(-1)
    q = torch.sigmoid(logits)
    ent = -(q * logp_keep + (1 - q) * logp_drop)
    expected = q.masked_fill(~eligible, 0.0).sum(-1) + forced.sum(-1)
    return KeepSample(keep, log_prob, ent.masked_fill(~eligible, 0.0).sum(-1), expected)


@dataclass
class CompressedInputs:
    """The kept tokens of each row, in order, right-padded to the longest row."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L] long, 1 on kept tokens
    position_ids: torch.Tensor  # [B, L] the original positions (0 on padding)
    lengths: torch.Tensor  # [B] kept tokens per row
    index: torch.Tensor  # [B, L] source column of each output slot
    padded: bool = True  # False when every row kept the same number of tokens

    def gather(self, values: torch.Tensor, pad_value) -> torch.Tensor:
        """Gather another ``[B, n]`` tensor aligned with the input (labels, fact masks, ...)."""
        out = values.gather(1, self.index)
        return out.masked_fill(~self.attention_mask.bool(), pad_value)


def apply_mask(
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int = 0,
    width: int | None = None,
) -> CompressedInputs:
    """Gather the tokens where ``mask`` is true (and ``attention_mask``, if given), keeping their
    order and original positions, and right-pad rows to one length. Rows that keep nothing come
    back as all padding. This physical shortening is what saves compute.

    ``width``: the number of tokens every row keeps, when the caller knows it (exact budgets on
    rows of one length); the output is then laid out without reading its size back from the
    device, which would stall the host until the device has caught up."""
    _check_same_shape(input_ids, mask)
    keep = mask.bool()
    if attention_mask is not None:
        _check_same_shape(input_ids, attention_mask, "attention_mask")
        keep = keep & attention_mask.bool()
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    elif position_ids.shape != input_ids.shape:
        if position_ids.dim() == 2 and position_ids.shape[0] == 1 and position_ids.shape[1] == input_ids.shape[1]:
            position_ids = position_ids.expand_as(input_ids)
        else:
            raise ForgetfulError(
                f"position_ids has shape {tuple(position_ids.shape)} but input_ids has {tuple(input_ids.shape)}"
            )
    lengths = keep.sum(1)
    if width is not None:
        shortest = width
    elif lengths.numel():  # one device->host transfer for both bounds (the width must be known on the host)
        shortest, width = torch.stack([lengths.min(), lengths.max()]).tolist()
    else:
        shortest = width = 0
    # A stable sort on "is forgotten" puts kept columns first, in their original order.
    index = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=input_ids.device).unsqueeze(0) < lengths.unsqueeze(1)
    ids = input_ids.gather(1, index).masked_fill(~valid, pad_token_id)
    pos = position_ids.gather(1, index).masked_fill(~valid, 0)
    return CompressedInputs(ids, valid.long(), pos, lengths, index, padded=shortest != width)


def compress_examples(
    context_ids: torch.Tensor,
    context_mask: torch.Tensor,
    keep: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
    pad_token_id: int = 0,
    kept_length: int | None = None,
    forget_layer: int = 0,
) -> dict[str, torch.Tensor]:
    """The LM input ``c[K] ++ y`` with original position ids, and labels on the target tokens
    (HF convention, unshifted). ``keep`` is ``[B, n]`` or ``[S, B, n]`` (S samples per row, which
    come out as ``S * B`` rows, sample-major). ``attention_mask`` is None when no row is padded
    (pass the dict to :func:`~forgetful.nll.token_nll`, which reads such rows as unpadded causal
    sequences). ``target_length`` is set when every row ends with its whole target and no row is
    padded (then token_nll can skip gathering positions). ``kept_length``: the context tokens every
    row keeps, when the caller knows it is the same for every row and no target is padded (exact
    budgets on contexts of one length, ``ForgetMask.kept_per_row``): then nothing is read back from
    the device. ``forget_layer`` L > 0: the forgotten tokens are dropped after layer L instead
    (:mod:`~forgetful.input.depth`): the dict then holds the whole row, packed, and the ``depth``
    plan that :func:`compressed_nll` follows; its labels are those of the shortened row."""
    if keep.dim() == 3:
        s = keep.shape[0]
        rep = lambda t: t.unsqueeze(0).expand(s, *t.shape).reshape(-1, t.shape[-1])  # noqa: E731
        context_ids, context_mask, target_ids, target_mask = map(
            rep, (context_ids, context_mask, target_ids, target_mask)
        )
        keep = keep.reshape(-1, keep.shape[-1])
    _check_same_shape(context_ids, keep, "keep mask")
    ids = torch.cat([context_ids, target_ids], 1)
    real = torch.cat([context_mask.bool(), target_mask.bool()], 1)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)  # original positions, skipping pad gaps
    full_keep = torch.cat([keep.bool() & context_mask.bool(), target_mask.bool()], 1)
    labels = torch.cat([torch.full_like(context_ids, -100), target_ids.masked_fill(~target_mask.bool(), -100)], 1)
    width = None if kept_length is None else kept_length + target_ids.shape[1]
    if forget_layer:
        return _at_depth(ids, real, full_keep, positions, labels, target_mask, pad_token_id, width, forget_layer)
    out = apply_mask(ids, full_keep, position_ids=positions, pad_token_id=pad_token_id, width=width)
    # Without padding the attention mask is None: token_nll then reads the rows as plain causal
    # sequences whose position ids have gaps (SDPA's fastest causal kernel, no mask built, eager or
    # compiled). With padding the mask is needed and passed.
    result = {
        "input_ids": out.input_ids,
        "attention_mask": out.attention_mask if out.padded else None,
        "position_ids": out.position_ids,
        "labels": out.gather(labels, -100),
        "target_length": None,
    }
    if kept_length is not None or (not out.padded and bool(target_mask.all())):
        # every row ends with its full target: the LM head is needed on the last positions only
        result["target_length"] = int(target_mask.shape[1])
    return result


def _at_depth(ids, real, full_keep, positions, labels, target_mask, pad_token_id, width, layer) -> dict:
    """:func:`compress_examples` for ``forget_layer`` > 0: the row packed (its real tokens first) and
    the plan that gathers the kept columns after ``layer`` layers."""
    from .depth import DepthPlan

    full = apply_mask(
        ids, real, position_ids=positions, pad_token_id=pad_token_id, width=None if width is None else ids.shape[1]
    )
    kept = full.gather(full_keep, False)
    short = apply_mask(full.input_ids, kept, position_ids=full.position_ids, pad_token_id=pad_token_id, width=width)
    plan = DepthPlan(
        layer,
        full_valid=full.attention_mask.bool() if full.padded else None,
        index=short.index,
        short_valid=short.attention_mask.bool() if short.padded else None,
    )
    every_target = width is not None or (not short.padded and bool(target_mask.all()))
    return {
        "input_ids": full.input_ids,
        "attention_mask": None,
        "position_ids": full.position_ids,
        "labels": short.gather(full.gather(labels, -100), -100),
        "target_length": int(target_mask.shape[1]) if every_target else None,
        "depth": plan,
        # for decoders that cannot shorten a row inside (GPT-2): the whole row's labels and a bias
        # that forgets the dropped columns after the layer, the same result
        "unshortened": {
            "labels": full.gather(labels, -100),
            "bias": torch.where(kept, 0.0, -1e4).masked_fill(~full.attention_mask.bool(), 0.0),
            "target_length": int(target_mask.shape[1]) if width is not None or not full.padded else None,
        },
    }


def compressed_nll(model, inputs: dict, loss_backend: str = "dense"):
    """The per-token target NLL (:class:`~forgetful.nll.TokenNLL`) of ``model`` on the output of
    :func:`compress_examples` (unpadded rows read as causal sequences at their original positions;
    with a ``depth`` plan, the whole row through the first layers and the kept tokens after them)."""
    import contextlib

    from ..nll import token_nll
    from .depth import DepthPlan, depth_forward, shortens_inside

    plan, labels, target_length = inputs.get("depth"), inputs["labels"], inputs["target_length"]
    if plan is not None and plan.index is not None and not shortens_inside(model):
        whole = inputs["unshortened"]
        plan = DepthPlan(plan.layer, full_valid=plan.full_valid, bias=whole["bias"])
        labels, target_length = whole["labels"], whole["target_length"]
    with depth_forward(model, plan) if plan is not None else contextlib.nullcontext():
        return token_nll(
            model,
            inputs["input_ids"],
            labels,
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            target_length=target_length,
            loss_backend=loss_backend,
        )


def biased_examples(
    context_ids: torch.Tensor,
    context_mask: torch.Tensor,
    log_keep: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    layer: int = 0,
    pad_token_id: int = 0,
) -> dict:
    """The LM input ``c ++ y`` (packed: each row's real tokens first, original positions), labels on
    the target, and the plan (:mod:`~forgetful.input.depth`) that adds ``log_keep`` (``[B, n]``: one value per context token, 0 for a
    token kept as it is, :data:`~forgetful.input.depth.FORGOTTEN` for one dropped) to the attention logits of the context
    keys in layers ``layer+1..N`` (0-based ``layer..N-1``). For
    :func:`~forgetful.input.compression.compressed_nll`, like the output of ``compress_examples``;
    ``log_keep`` keeps its graph, so the NLL has a gradient in it."""
    from .depth import DepthPlan

    if log_keep.shape != context_ids.shape:
        raise ForgetfulError(f"log_keep has shape {tuple(log_keep.shape)}, the context {tuple(context_ids.shape)}")
    ids = torch.cat([context_ids, target_ids], 1)
    real = torch.cat([context_mask.bool(), target_mask.bool()], 1)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    labels = torch.cat([torch.full_like(context_ids, -100), target_ids.masked_fill(~target_mask.bool(), -100)], 1)
    packed = apply_mask(ids, real, position_ids=positions, pad_token_id=pad_token_id)
    bias = torch.cat([log_keep.float(), torch.zeros(target_ids.shape, device=log_keep.device)], 1)
    bias = bias.gather(1, packed.index).masked_fill(~packed.attention_mask.bool(), 0.0)
    valid = packed.attention_mask.bool() if packed.padded else None
    every_target = not packed.padded and bool(target_mask.all())
    return {
        "input_ids": packed.input_ids,
        "attention_mask": None,
        "position_ids": packed.position_ids,
        "labels": packed.gather(labels, -100),
        "target_length": int(target_ids.shape[1]) if every_target else None,
        "depth": DepthPlan(layer, full_valid=valid, bias=bias),
    }
