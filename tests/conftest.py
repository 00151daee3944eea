"""Shared fixtures: tiny models (vocab < 400, d = 32) built once per session, offline."""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# The tests' converted models and hash stamps go to a folder of their own, removed at the end:
# `make test` leaves nothing in the user's ~/.cache/forgetful.
_CACHE = tempfile.mkdtemp(prefix="forgetful-test-cache-")
os.environ["FORGETFUL_CACHE"] = _CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


def tiny_corpus(n: int = 200) -> list[str]:
    from forgetful.data.embedded import pretraining_documents

    return pretraining_documents(n, seed=0, copy_docs=n // 10)


def make_tiny(name: str = "tiny-gpt2", vocab_size: int = 400, hidden: int = 32, layers: int = 2, seed: int = 0):
    from forgetful.models import build_model

    return build_model(
        name, corpus=tiny_corpus(), vocab_size=vocab_size, seed=seed, hidden_size=hidden, num_layers=layers, num_heads=2
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that train or evaluate tiny models many times (opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): they run ~100x faster on one
    thread than on two when the 2-core machine is shared (OpenMP threads spin-wait on each other);
    the setting is restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_gpt2():
    return make_tiny("tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny("tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_llama):
    """A saved tiny-llama + tokenizer, loadable with from_pretrained."""
    model, tok = tiny_llama
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data beside the checkout (real WikiText-2 and TOFU); tests that need it skip without it."""
    from pathlib import Path

    for base in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("../shared/data").resolve()):
        if base.is_dir():
            return base
    pytest.skip("../shared/data is not available")


def install_liger_stand_in(monkeypatch) -> list[dict]:
    """A CPU stand-in for Liger's chunked fused linear cross-entropy forward
    (``liger_kernel.ops.fused_linear_cross_entropy.fused_linear_cross_entropy_forward``, CUDA-only):
    its keyword signature and return tuple, the per-token loss and, with ``compute_gradients``, the
    gradients for ``token_grad_output`` (ones when None), computed by the chunked backend's own
    pass. Returns the list every call's arguments are recorded in."""
    import sys
    import types

    import forgetful.nll_kernels as kernels

    calls: list[dict] = []

    def fused_linear_cross_entropy_forward(
        _input, weight, target, *, bias=None, ignore_index=-100, reduction="mean", softcap=None, accum_dtype=None,
        token_grad_output=None, compute_gradients=None, weight_requires_grad=None, chunk_mem_const=1,
    ):  # fmt: skip
        calls.append(
            dict(
                input=_input, weight=weight, bias=bias, reduction=reduction, softcap=softcap, accum_dtype=accum_dtype,
                ignore_index=ignore_index, token_grad_output=token_grad_output, compute_gradients=compute_gradients,
                chunk_mem_const=chunk_mem_const,
            )
        )  # fmt: skip
        assert _input.dim() == 2 and _input.is_contiguous() and reduction == "none"
        up = None
        if compute_gradients:
            up = torch.ones(len(target)) if token_grad_output is None else token_grad_output.float()
        needs = (True, bool(weight_requires_grad), bias is not None)
        nll, _, dh, dw, db = kernels.chunked_pass(
            _input, weight, bias, target, softcap, 8, _input.dtype, up, needs=needs
        )
        return nll, None, None, None, dh, None if dw is None else dw.to(weight.dtype), db

    fused = types.ModuleType("liger_kernel.ops.fused_linear_cross_entropy")
    fused.fused_linear_cross_entropy_forward = fused_linear_cross_entropy_forward
    for name in ("liger_kernel", "liger_kernel.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.fused_linear_cross_entropy", fused)
    return calls


def tiny_tofu_config(model_dir, out, **kw):
    """A ``TofuExperimentConfig`` at the tests' tiny scale (5 authors, 4 evaluation rows, 3 new tokens,
    unlearning at lr 1e-3); ``kw`` overrides any field."""
    from forgetful.tofu.experiment import TofuExperimentConfig

    base = dict(
        model=str(model_dir),
        out=str(out),
        num_authors=5,
        max_new_tokens=3,
        max_eval_examples=4,
        eval_batch_size=4,
        unlearn_learning_rate=1e-3,
    )
    return TofuExperimentConfig(**{**base, **kw})
