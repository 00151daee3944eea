"""A FLOP model of a decoder forward pass, for comparing compressed and full lengths.

Matrix multiplies count 2 FLOPs per multiply-add. Per layer and token: the attention projections
(Q, K, V, O; grouped-query attention shrinks K and V) and the MLP (two matrices, or three when
gated as in Llama). Causal attention scores and the weighted sum cost ``2 * 2 * d * L`` per query
over the whole row; a causal query sees ``L / 2`` keys on average, so a sequence of ``L`` tokens
pays ``2 * d * L**2`` per layer. The LM head costs ``2 * d * V`` per position that gets logits.
Norms, activations and softmax are left out (they are a few percent).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool

    @property
    def layer_matmul_params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return attn + mlp


def decoder_dims(config) -> DecoderDims:
    """Sizes of a HF decoder config (GPT-2 and Llama-style names)."""

    def g(*names, default=None):  # the first of the names the config sets
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)

    hidden = g("hidden_size", "n_embd", "d_model")
    heads = g("num_attention_heads", "n_head")
    gated = hasattr(config, "intermediate_size") and getattr(config, "model_type", "") not in (
        "gpt2",
        "gpt_neox",
        "gptj",
    )
    return DecoderDims(
        hidden=hidden,
        layers=g("num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=g("num_key_value_heads", default=heads),
        intermediate=g("intermediate_size", "n_inner", default=None) or 4 * hidden,
        vocab=config.vocab_size,
        gated_mlp=gated,
    )


def forward_flops(config, length: int, logit_positions: int | None = None) -> float:
    """Forward FLOPs of one sequence of ``length`` tokens with logits at ``logit_positions``
    (default: every position)."""
    d = decoder_dims(config)
    h = length if logit_positions is None else logit_positions
    linear = 2.0 * d.layers * d.layer_matmul_params * length
    attention = 2.0 * d.layers * d.hidden * length * length
    head = 2.0 * d.hidden * d.vocab * h
    return linear + attention + head


def depth_forward_flops(
    config, full_length: int, kept_length: int, forget_layer: int, logit_positions: int | None = None
) -> float:
    """Forward FLOPs of a row forgotten at depth (:mod:`~forgetful.input.depth`): the first
    ``forget_layer`` layers at ``full_length`` tokens, the others at ``kept_length``, logits at
    ``logit_positions`` (default every kept position). ``forget_layer`` 0 is input forgetting."""
    d = decoder_dims(config)
    early = min(max(forget_layer, 0), d.layers)

    def layers(count: int, length: int) -> float:
        return 2.0 * count * (d.layer_matmul_params * length + d.hidden * length * length)

    h = kept_length if logit_positions is None else logit_positions
    return layers(early, full_length) + layers(d.layers - early, kept_length) + 2.0 * d.hidden * d.vocab * h


def body_flops_per_token(config, length: int, layers: int) -> float:
    """FLOPs per token of the first ``layers`` decoder layers over a row of ``length`` tokens (no
    head): what a scorer that reads early layers pays, and what forgetting at depth shares with it."""
    d = decoder_dims(config)
    count = min(max(layers, 0), d.layers)
    return 2.0 * count * (d.layer_matmul_params + d.hidden * length)


def forward_flops_per_token(config, length: int) -> float:
    """Average forward FLOPs per token at ``length`` (logits everywhere)."""
    return forward_flops(config, length) / max(length, 1)


def attention_flops(config, length: int) -> float:
    d = decoder_dims(config)
    return 2.0 * d.layers * d.hidden * length * length
