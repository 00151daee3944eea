"""Forgetting at depth and the attention-key bias, against input forgetting and the identity (fp32)."""

from __future__ import annotations

import pytest
import torch

from forgetful.errors import ForgetfulError
from forgetful.input.compression import biased_examples, compress_examples, compressed_nll
from forgetful.input.depth import FORGOTTEN
from forgetful.models.layers import num_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(vocab: int, padded: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(3, vocab, (3, 12), generator=g)
    tgt = torch.randint(3, vocab, (3, 4), generator=g)
    ctx_mask = torch.ones_like(ctx, dtype=torch.bool)
    tgt_mask = torch.ones_like(tgt, dtype=torch.bool)
    if padded:  # rows of different lengths, padded in the middle of c ++ y
        ctx_mask[1, 9:] = False
        ctx_mask[2, 7:] = False
        tgt_mask[2, 3:] = False
    keep = torch.rand(ctx.shape, generator=g) < 0.5
    keep[:, 0] = True
    keep[:, 1] = False  # a dropped token before kept ones
    keep[:, 5] = True
    # the token that predicts the first target token is kept (at L = N the dropped tokens then
    # change nothing: they only ever fed the final norm and the head)
    last = ctx_mask.long().sum(1) - 1
    keep[torch.arange(3), last] = True
    return ctx, ctx_mask, keep & ctx_mask, tgt, tgt_mask


def _nll(model, inputs):
    with torch.no_grad():
        return compressed_nll(model, inputs).mean_per_row()


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("padded", [False, True])
def test_depth_zero_and_all_layers_and_the_bias_agree(arch, padded, request):
    model, _ = request.getfixturevalue(arch)
    model.eval()
    ctx, cm, keep, tgt, tm = _rows(model.config.vocab_size, padded)
    layers = num_layers(model)
    input_forgetting = _nll(model, compress_examples(ctx, cm, keep, tgt, tm))
    identity = _nll(model, compress_examples(ctx, cm, cm, tgt, tm))
    everything_read = _nll(model, compress_examples(ctx, cm, keep, tgt, tm, forget_layer=layers))
    torch.testing.assert_close(everything_read, identity, atol=1e-5, rtol=0)
    hard = torch.where(keep, 0.0, FORGOTTEN)
    biased = _nll(model, biased_examples(ctx, cm, hard, tgt, tm, layer=0))
    torch.testing.assert_close(biased, input_forgetting, atol=1e-5, rtol=0)
    for layer in range(1, layers):
        dropped = _nll(model, compress_examples(ctx, cm, keep, tgt, tm, forget_layer=layer))
        biased = _nll(model, biased_examples(ctx, cm, hard, tgt, tm, layer=layer))
        torch.testing.assert_close(dropped, biased, atol=1e-5, rtol=0)
        # layers 1..L read the dropped tokens: the kept ones carry what they merged
        assert (dropped - input_forgetting).abs().max() > 1e-4


def test_the_bias_gives_every_context_token_a_gradient(tiny_llama):
    model, _ = tiny_llama
    ctx, cm, _, tgt, tm = _rows(model.config.vocab_size, padded=False)
    log_keep = torch.full(ctx.shape, -0.5, requires_grad=True)
    out = compressed_nll(model, biased_examples(ctx, cm, log_keep, tgt, tm, layer=1))
    out.nll.sum().backward()
    grad = log_keep.grad
    assert torch.isfinite(grad).all()
    assert (grad[:, 1:].abs() > 0).float().mean() > 0.9  # keys of every context token are read


def test_forget_layer_out_of_range_is_refused(tiny_llama):
    model, _ = tiny_llama
    ctx, cm, keep, tgt, tm = _rows(model.config.vocab_size, padded=False)
    with pytest.raises(ForgetfulError, match="forget_layer must lie in 0..2"):
        compressed_nll(model, compress_examples(ctx, cm, keep, tgt, tm, forget_layer=9))
