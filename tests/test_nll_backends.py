"""Loss backends: chunked equals dense (loss, per-token NLL, gradients) on the kernel and through
models (tied and untied heads, a head bias, soft-capping, logit scaling, LoRA on the head, heads
that must be called), empty batches, the choice of ``auto``, the one-line errors for the GPU
kernels, and how the CCE / Liger calls are made (with stand-ins for the CUDA-only packages)."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import install_liger_stand_in
from torch import nn

import forgetful.nll_backends as lk
import forgetful.nll_kernels as kernels
from forgetful.errors import ForgetfulError
from forgetful.nll import token_nll
from forgetful.nll_backends import HeadSpec, check_loss_backend, head_spec, resolve_loss_backend
from forgetful.nll_kernels import ChunkedLinearNLL, linear_nll

VOCAB = 300


def _reference(h, w, b, t, softcap=None):
    z = F.linear(h, w, b).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, t, reduction="none")


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("rows", [1, 7, 64], ids=["rows1", "rows7", "one-chunk"])
@pytest.mark.parametrize(
    "summed,uniform", [(False, False), (True, True), (True, False)], ids=["weighted", "summed-mean", "summed-weighted"]
)
def test_chunked_function_matches_cross_entropy(bias, softcap, rows, summed, uniform):
    g = torch.Generator().manual_seed(0)
    n, d = 37, 16
    h = torch.randn(n, d, generator=g)
    w = torch.randn(VOCAB, d, generator=g) * 0.5
    b = torch.randn(VOCAB, generator=g) if bias else None
    t = torch.randint(0, VOCAB, (n,), generator=g)
    # per-token upstream gradients, not all ones (REINFORCE, weights), or one weight (a mean)
    up = torch.full((n,), 1 / n) if uniform else torch.rand(n, generator=g) + 0.5
    ref_in = [_leaf(h), _leaf(w)] + ([_leaf(b)] if bias else [])
    got_in = [_leaf(h), _leaf(w)] + ([_leaf(b)] if bias else [])
    ref = _reference(ref_in[0], ref_in[1], ref_in[2] if bias else None, t, softcap)
    b_in = got_in[2] if bias else None
    got = ChunkedLinearNLL.apply(got_in[0], got_in[1], b_in, t, softcap, rows, torch.float32, summed)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6)
    (ref * up).sum().backward()
    (got * up).sum().backward()
    for a, b_ in zip(ref_in, got_in):
        assert torch.allclose(b_.grad, a.grad, atol=1e-5, rtol=0)
    assert ref_in[1].grad.abs().max() > 1e-3  # the check above compares real gradients


@pytest.mark.parametrize("summed,uniform,passes", [(False, True, 2), (True, True, 1), (True, False, 2)])
def test_summed_chunked_makes_one_pass_when_the_weights_are_uniform(monkeypatch, summed, uniform, passes):
    """``summed`` computes the gradients with the forward's logits (three matmuls, not four), and only
    a uniform upstream gradient uses them: the backward's check decides, not the hint."""
    calls = []
    real = kernels.chunked_pass
    monkeypatch.setattr(kernels, "chunked_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    h, w = _leaf(torch.randn(20, 8, generator=g)), _leaf(torch.randn(VOCAB, 8, generator=g))
    t = torch.randint(0, VOCAB, (20,), generator=g)
    nll = ChunkedLinearNLL.apply(h, w, None, t, None, 6, torch.float32, summed)
    up = torch.full((20,), 0.3) if uniform else torch.linspace(0.1, 1, 20)
    (nll * up).sum().backward()
    assert len(calls) == passes


def test_summed_chunked_survives_a_second_backward_and_skips_gradients_without_grad():
    """The forward's gradients are scaled in place once: a second backward (``retain_graph``)
    recomputes; a forward that needs no gradient computes none."""
    g = torch.Generator().manual_seed(4)
    h, w = _leaf(torch.randn(20, 8, generator=g)), _leaf(torch.randn(VOCAB, 8, generator=g))
    t = torch.randint(0, VOCAB, (20,), generator=g)
    loss = ChunkedLinearNLL.apply(h, w, None, t, None, 6, torch.float32, True).mean()
    loss.backward(retain_graph=True)
    loss.backward()
    ref_h, ref_w = _leaf(h), _leaf(w)
    (2 * _reference(ref_h, ref_w, None, t).mean()).backward()
    assert torch.allclose(h.grad, ref_h.grad, atol=1e-6) and torch.allclose(w.grad, ref_w.grad, atol=1e-6)
    with torch.no_grad():
        out = linear_nll(h, t, HeadSpec(w, None, lambda x: F.linear(x, w)), "chunked", summed=True)
    assert not out.requires_grad and torch.allclose(out, _reference(h, w, None, t), atol=1e-5)


def test_chunked_bf16_under_autocast_is_close_to_dense_and_keeps_float32_gradients():
    """Matmuls in the autocast dtype, softmax and weight-gradient accumulation in float32."""
    g = torch.Generator().manual_seed(1)
    h = _leaf(torch.randn(50, 32, generator=g))
    w = _leaf(torch.randn(VOCAB, 32, generator=g) * 0.2)
    t = torch.randint(0, VOCAB, (50,), generator=g)
    spec = HeadSpec(w, None, lambda x: F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_nll(h, t, spec, "chunked", rows=8)
    got.sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    _reference(h.double(), w.double(), None, t).sum().backward()
    assert gh.dtype == gw.dtype == torch.float32
    ref = _reference(h.double(), w.double(), None, t)
    assert (got.double() - ref).abs().max() < 0.05
    for a, b in ((gh, h.grad), (gw, w.grad)):
        assert F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0) > 0.999


def test_empty_batch_gives_an_empty_nll_connected_to_the_head():
    w = _leaf(torch.randn(VOCAB, 8))
    h = _leaf(torch.randn(0, 8))
    for backend in ("chunked", "dense"):
        nll = linear_nll(h, torch.zeros(0, dtype=torch.long), HeadSpec(w, None, lambda x: F.linear(x, w)), backend)
        assert nll.shape == (0,) and nll.requires_grad
        loss = nll.sum()
        loss.backward()
        assert loss.item() == 0.0 and w.grad is not None and w.grad.abs().max() == 0


# --------------------------------------------------------------------------------------------
# Through models: token_nll with each backend against the dense path
# --------------------------------------------------------------------------------------------


def _batch(vocab: int, seed: int = 0, density: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 19), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 14:] = 0  # a padded row
    labels = torch.where(torch.rand(ids.shape, generator=g) < density, ids, torch.full_like(ids, -100))
    labels[attn == 0] = -100
    labels[:, 0] = -100
    return ids, attn, labels


def _nll_and_grads(model, backend, ids, attn, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = token_nll(model, ids, labels, attention_mask=attn, loss_backend=backend, **kw)
    loss = out.nll.sum() / max(out.nll.numel(), 1)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), out, grads


def _assert_same(model, ids, attn, labels, backend="chunked", **kw):
    loss_d, out_d, grads_d = _nll_and_grads(model, "dense", ids, attn, labels, **kw)
    loss_c, out_c, grads_c = _nll_and_grads(model, backend, ids, attn, labels, **kw)
    assert abs(loss_c.item() - loss_d.item()) <= 1e-6, (loss_c, loss_d)
    assert torch.allclose(out_c.nll, out_d.nll, atol=1e-5, rtol=0)
    assert torch.equal(out_c.rows, out_d.rows) and out_c.batch_size == out_d.batch_size
    assert set(grads_c) == set(grads_d) and grads_d
    for name in grads_d:
        assert torch.allclose(grads_c[name], grads_d[name], atol=1e-5, rtol=0), name
    return grads_d


@pytest.fixture
def small_chunks(monkeypatch):
    """A chunk of logits holds 2 rows (1 for the 400-token tiny models): every batch spans many chunks."""
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 2 * VOCAB)


def _hf(config_cls, model_cls, **kw):
    import transformers

    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    base.update(kw)
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**base)
    cfg._attn_implementation = "eager"
    return getattr(transformers, model_cls)(cfg).float()


def test_chunked_matches_dense_on_a_tied_llama(tiny_llama, small_chunks):
    model = copy.deepcopy(tiny_llama[0]).float()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    ids, attn, labels = _batch(VOCAB)
    grads = _assert_same(model, ids, attn, labels)
    assert grads["model.embed_tokens.weight"].abs().max() > 1e-4


def test_chunked_matches_dense_on_gpt2(tiny_gpt2, small_chunks):
    _assert_same(copy.deepcopy(tiny_gpt2[0]).float(), *_batch(VOCAB, seed=1))


def test_chunked_matches_dense_on_an_untied_head_with_a_bias(small_chunks):
    model = _hf("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=False)
    model.lm_head = nn.Linear(32, VOCAB, bias=True)
    nn.init.normal_(model.lm_head.bias, std=1.0)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    grads = _assert_same(model, *_batch(VOCAB, seed=2))
    assert grads["lm_head.bias"].abs().max() > 1e-4


def test_chunked_applies_gemma2_logit_softcapping(small_chunks):
    """The dense path lets the model cap its logits; chunked caps them itself, identically."""
    model = _hf("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, final_logit_softcapping=0.7)
    spec = head_spec(model.lm_head, config=model.config)
    assert spec.softcap == 0.7
    ids, attn, labels = _batch(VOCAB, seed=3)
    _assert_same(model, ids, attn, labels)
    # and the cap matters: without it the NLL differs
    model.config.final_logit_softcapping = None
    uncapped = token_nll(model, ids, labels, attention_mask=attn, loss_backend="chunked").nll
    model.config.final_logit_softcapping = 0.7
    capped = token_nll(model, ids, labels, attention_mask=attn, loss_backend="chunked").nll
    assert (capped - uncapped).abs().max() > 1e-2


def test_chunked_folds_granite_logit_scaling(small_chunks):
    model = _hf("GraniteConfig", "GraniteForCausalLM", logits_scaling=4.0)
    assert head_spec(model.lm_head, config=model.config).scale == 0.25
    _assert_same(model, *_batch(VOCAB, seed=4))


def test_chunked_with_target_length_matches_dense(tiny_llama, small_chunks):
    """The REINFORCE form: the labels are the last m tokens of every row, selected by logits_to_keep."""
    model = copy.deepcopy(tiny_llama[0]).float()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    loss_d, out_d, grads_d = _nll_and_grads(model, "dense", ids, None, labels, target_length=3)
    loss_c, out_c, grads_c = _nll_and_grads(model, "chunked", ids, None, labels, target_length=3)
    assert torch.allclose(out_c.nll, out_d.nll, atol=1e-5, rtol=0) and torch.equal(out_c.rows, out_d.rows)
    for name in grads_d:
        assert torch.allclose(grads_c[name], grads_d[name], atol=1e-5, rtol=0), name


def test_all_masked_batch_gives_zero_loss_and_zero_gradients(tiny_llama, small_chunks):
    model = copy.deepcopy(tiny_llama[0]).float()
    ids, attn, labels = _batch(VOCAB, seed=6)
    labels[:] = -100
    out = token_nll(model, ids, labels, attention_mask=attn, loss_backend="chunked")
    loss = out.nll.sum()
    assert out.nll.shape == (0,) and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().max() == 0 for g in grads)


def _lora(model, **kw):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **kw)
    return get_peft_model(copy.deepcopy(model).float(), config)


def test_chunked_matches_dense_with_lora_on_the_head(tiny_llama, small_chunks):
    model = _lora(tiny_llama[0], target_modules=["lm_head", "q_proj"])
    head = model.get_output_embeddings()
    spec = head_spec(head)
    assert spec.kind == "lora"  # the merged weight W + s * B @ A, not the base weight alone
    assert not torch.equal(spec.weight, head.get_base_layer().weight)
    grads = _assert_same(model, *_batch(VOCAB, seed=7))
    lora_b = [n for n in grads if "lm_head" in n and "lora_B" in n]
    assert lora_b and grads[lora_b[0]].abs().max() > 1e-5


def test_chunked_calls_heads_that_are_not_one_weight_chunk_by_chunk(tiny_llama, small_chunks):
    """DoRA on the head has no single weight matrix: its own forward runs per chunk, checkpointed."""
    model = _lora(tiny_llama[0], target_modules=["lm_head"], use_dora=True)
    assert head_spec(model.get_output_embeddings()).weight is None
    _assert_same(model, *_batch(VOCAB, seed=8))


def test_chunked_reads_a_modules_to_save_head(tiny_llama, small_chunks):
    model = _lora(tiny_llama[0], target_modules=["q_proj"], modules_to_save=["lm_head"])
    head = model.get_output_embeddings()
    assert head_spec(head).kind == "linear"
    _assert_same(model, *_batch(VOCAB, seed=9))


def test_never_more_than_one_chunk_of_logits(tiny_llama, monkeypatch):
    """The chunked backend's largest tensor is one chunk of logits, not [N, vocab]."""
    from forgetful.measure import LiveTensorMemory

    model = copy.deepcopy(tiny_llama[0]).float()
    vocab = model.config.vocab_size
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 4 * vocab)
    ids, attn, labels = _batch(VOCAB, seed=10, density=1.0)
    n = int((labels[:, 1:] != -100).sum())
    largest = {}

    class Largest(LiveTensorMemory):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if func.is_view:  # views of the weight (its transpose) are not logits
                return out
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab:
                    largest[str(func)] = max(largest.get(str(func), 0), t.numel() // vocab)
            return out

    for backend, limit in (("chunked", 4), ("dense", n)):
        largest.clear()
        with Largest():
            token_nll(model, ids, labels, attention_mask=attn, loss_backend=backend).nll.sum().backward()
        assert max(largest.values()) == limit, (backend, largest)


# --------------------------------------------------------------------------------------------
# Choosing a backend, and the errors
# --------------------------------------------------------------------------------------------


def test_auto_is_chunked_on_the_cpu_even_with_the_kernels_installed(monkeypatch, tiny_llama):
    monkeypatch.setattr(lk, "kernel_available", lambda package: True)
    assert resolve_loss_backend("auto", "cpu", torch.bfloat16) == "chunked"
    calls = []
    real = ChunkedLinearNLL.apply
    monkeypatch.setattr(ChunkedLinearNLL, "apply", lambda *a: calls.append(1) or real(*a))
    ids, attn, labels = _batch(VOCAB)
    token_nll(tiny_llama[0], ids, labels, attention_mask=attn, loss_backend="auto")
    assert calls == [1]


def test_auto_picks_liger_on_cuda_with_it_installed_and_never_cce(monkeypatch):
    """auto chooses only backends whose gradients are dense's up to rounding: Liger (float32
    accumulation, any dtype, a bias) when installed, else chunked; CCE 25.1.1 (bf16 accumulation of
    its gradients) never, even when it is the only kernel installed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lk, "kernel_available", lambda package: True)
    linear = HeadSpec(torch.zeros(4, 2), None, lambda x: x)
    biased = HeadSpec(torch.zeros(4, 2), torch.zeros(4), lambda x: x)
    called = HeadSpec(None, None, lambda x: x)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert resolve_loss_backend("auto", "cuda", dtype, linear) == "liger"
    assert resolve_loss_backend("auto", "cuda", torch.bfloat16, biased) == "liger"
    assert resolve_loss_backend("auto", "cuda", torch.bfloat16, called) == "chunked"  # Liger needs one matrix
    assert resolve_loss_backend("auto", "cpu", torch.bfloat16, linear) == "chunked"
    assert resolve_loss_backend("auto", "cuda", torch.bfloat16, linear, targets_at_end=True) == "dense"
    assert resolve_loss_backend("cce", "cuda", torch.bfloat16, linear) == "cce"  # by name it stays available
    monkeypatch.setattr(lk, "kernel_available", lambda package: package == "cut_cross_entropy")
    assert resolve_loss_backend("auto", "cuda", torch.bfloat16, linear) == "chunked"
    monkeypatch.setattr(lk, "kernel_available", lambda package: False)
    assert resolve_loss_backend("auto", "cuda", torch.bfloat16, linear) == "chunked"


def test_auto_runs_liger_through_token_nll_when_it_is_installed(fake_kernels, tiny_llama):
    model = copy.deepcopy(tiny_llama[0]).float()
    ids, attn, labels = _batch(VOCAB, seed=13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        token_nll(model, ids, labels, attention_mask=attn, loss_backend="auto")
    assert len(fake_kernels["liger"]) == 1 and fake_kernels["cce"] == []


@pytest.mark.parametrize("backend", ["cce", "liger"])
def test_gpu_backends_fail_with_one_line_on_the_cpu(backend, tiny_llama):
    with pytest.raises(ForgetfulError, match=f"loss_backend='{backend}' runs only on a CUDA GPU") as err:
        check_loss_backend(backend, "cpu")
    assert "\n" not in str(err.value) and "chunked" in str(err.value)
    ids, attn, labels = _batch(VOCAB)
    with pytest.raises(ForgetfulError, match="runs only on a CUDA GPU"):
        token_nll(tiny_llama[0], ids, labels, attention_mask=attn, loss_backend=backend)


@pytest.mark.parametrize("backend,package", [("cce", "cut_cross_entropy"), ("liger", "liger_kernel")])
def test_gpu_backends_without_their_package_name_the_extra(backend, package, monkeypatch):
    monkeypatch.setattr(lk, "cuda_usable", lambda device: True)
    monkeypatch.setattr(lk, "kernel_available", lambda name: False)
    with pytest.raises(ForgetfulError, match=rf"needs the {package} package.*forgetful\[gpu\]") as err:
        check_loss_backend(backend, "cuda")
    assert "\n" not in str(err.value)


def test_unknown_backend_is_refused():
    with pytest.raises(ForgetfulError, match="loss_backend must be one of auto, dense, chunked, cce, liger"):
        check_loss_backend("fast")


def test_sparse_logits_false_is_a_dense_option(tiny_llama):
    ids, attn, labels = _batch(VOCAB)
    full = token_nll(tiny_llama[0], ids, labels, attention_mask=attn, sparse_logits=False, loss_backend="auto").nll
    dense = token_nll(tiny_llama[0], ids, labels, attention_mask=attn).nll
    assert torch.allclose(full, dense, atol=1e-5)
    with pytest.raises(ForgetfulError, match="sparse_logits=False"):
        token_nll(tiny_llama[0], ids, labels, attention_mask=attn, sparse_logits=False, loss_backend="chunked")


# --------------------------------------------------------------------------------------------
# How the CUDA-only kernels are called (stand-ins with their signatures, computing on the CPU)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_kernels(monkeypatch):
    """Stand-ins for ``cut_cross_entropy.linear_cross_entropy`` and Liger's chunked fused linear CE
    forward (``conftest.install_liger_stand_in``): keyword-only where forgetful must use keywords,
    computing the reference NLL (and Liger's gradients); every call is recorded. CUDA is declared usable, so the CPU runs the GPU code paths."""
    calls: dict[str, list] = {"cce": [], "liger": install_liger_stand_in(monkeypatch)}

    def linear_cross_entropy(*, e, c, targets, ignore_index, softcap, reduction, filter_eps):
        calls["cce"].append(
            dict(e=e, c=c, ignore_index=ignore_index, softcap=softcap, reduction=reduction, filter_eps=filter_eps)
        )
        assert e.dtype == c.dtype in (torch.bfloat16, torch.float16)  # PyPI CCE: no float32 backward
        return _reference(e.float(), c.float(), None, targets, softcap)

    cce = types.ModuleType("cut_cross_entropy")
    cce.linear_cross_entropy = linear_cross_entropy
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", cce)
    monkeypatch.setattr(lk, "cuda_usable", lambda device: True)
    monkeypatch.setattr(lk, "kernel_available", lambda name: True)
    return calls


def test_cce_gets_the_scored_rows_in_bf16_with_exact_gradients_and_the_softcap(fake_kernels):
    model = _hf("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, final_logit_softcapping=0.7)
    ids, attn, labels = _batch(VOCAB, seed=11)
    n = int((labels != -100).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_nll(model, ids, labels, attention_mask=attn, loss_backend="cce")
        ref = token_nll(model, ids, labels, attention_mask=attn, loss_backend="chunked")
    (call,) = fake_kernels["cce"]
    assert call["reduction"] == "none" and call["filter_eps"] is None and call["softcap"] == 0.7
    assert call["ignore_index"] == -100 and call["e"].shape == (n, 32) and call["c"].shape == (VOCAB, 32)
    assert torch.allclose(got.nll, ref.nll, atol=1e-3) and torch.equal(got.rows, ref.rows)
    got.nll.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().max() > 0


def test_cce_refuses_float32_and_a_bias_with_one_line(fake_kernels):
    model = _hf("LlamaConfig", "LlamaForCausalLM")
    ids, attn, labels = _batch(VOCAB)
    with pytest.raises(ForgetfulError, match="needs bf16 or fp16.*float32") as err:
        token_nll(model, ids, labels, attention_mask=attn, loss_backend="cce")
    assert "\n" not in str(err.value)
    model.lm_head = nn.Linear(32, VOCAB, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ForgetfulError, match="no bias"):
        token_nll(model, ids, labels, attention_mask=attn, loss_backend="cce")
    assert fake_kernels["cce"] == []


def _liger_model():
    model = _hf("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, final_logit_softcapping=0.7)
    model.lm_head = nn.Linear(32, VOCAB, bias=True)
    return model


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_liger_gets_the_scored_rows_with_per_token_reduction_bias_and_softcap(fake_kernels):
    model = _liger_model()
    ids, attn, labels = _batch(VOCAB, seed=12)
    got = token_nll(model, ids, labels, attention_mask=attn, loss_backend="liger")
    (call,) = fake_kernels["liger"]
    assert call["reduction"] == "none" and call["softcap"] == 0.7 and call["bias"] is model.lm_head.bias
    assert call["weight"] is model.lm_head.weight  # no copy: Liger keeps float32 weight gradients itself
    assert call["accum_dtype"] is torch.float32  # bf16 weights too: one rounding of their gradient, as dense
    assert call["ignore_index"] == -100 and not call["compute_gradients"]  # per-token weights unknown yet
    up = torch.rand(got.nll.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    (got.nll * up).sum().backward()
    liger_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    ref = token_nll(model, ids, labels, attention_mask=attn, loss_backend="chunked")
    (ref.nll * up).sum().backward()
    assert torch.allclose(got.nll, ref.nll, atol=1e-5)
    recompute = fake_kernels["liger"][1]  # the backward: each token's weight folded in by Liger
    assert recompute["compute_gradients"] and torch.equal(recompute["token_grad_output"], up)
    for name, g in _grads(model).items():
        assert torch.allclose(liger_grads[name], g, atol=1e-5), name


@pytest.mark.parametrize("uniform", [True, False], ids=["mean", "weighted"])
def test_liger_summed_computes_the_gradients_in_the_forward_and_checks_the_weights(fake_kernels, uniform):
    """``summed``: one Liger pass (three head matmuls) when the caller does reduce with one weight;
    when it does not, the backward notices and recomputes with each token's weight (still exact)."""
    model = _liger_model()
    ids, attn, labels = _batch(VOCAB, seed=14)
    got = token_nll(model, ids, labels, attention_mask=attn, loss_backend="liger", summed=True)
    n = got.nll.numel()
    up = torch.full((n,), 1 / n) if uniform else torch.rand(n, generator=torch.Generator().manual_seed(1))
    (got.nll * up).sum().backward()
    liger_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    (token_nll(model, ids, labels, attention_mask=attn, loss_backend="chunked").nll * up).sum().backward()
    calls = fake_kernels["liger"]
    assert calls[0]["compute_gradients"] and calls[0]["token_grad_output"] is None
    assert len(calls) == (1 if uniform else 2)
    for name, g in _grads(model).items():
        assert torch.allclose(liger_grads[name], g, atol=1e-6), name
        assert g.abs().max() > 0, name


@pytest.mark.parametrize("backend", ["cce", "liger"])
def test_kernels_are_not_called_for_an_all_masked_batch(fake_kernels, backend, tiny_llama):
    """Both kernels divide by zero on zero rows; the empty batch never reaches them."""
    model = copy.deepcopy(tiny_llama[0]).float()
    ids, attn, labels = _batch(VOCAB)
    labels[:] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = token_nll(model, ids, labels, attention_mask=attn, loss_backend=backend)
    out.nll.sum().backward()
    assert fake_kernels[backend] == [] and out.nll.shape == (0,)
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in model.parameters())
