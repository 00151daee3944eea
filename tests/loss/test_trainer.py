"""SelectiveLossTrainer: exact masked loss, exact gradient accumulation, all-masked batches,
loss_mask surviving remove_unused_columns, validation, PEFT and trackers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import install_liger_stand_in
from datasets import Dataset

from forgetful.errors import ForgetfulError
from forgetful.loss.trainer import (
    SelectiveLossCollator,
    SelectiveLossConfig,
    SelectiveLossTrainer,
    labels_from_loss_mask,
)


def _dataset(vocab: int, n: int = 8, seed: int = 0) -> Dataset:
    """Rows of different lengths and sparse, uneven loss masks (so per-micro-batch token counts differ)."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for i in range(n):
        length = int(rng.integers(6, 20))
        ids.append(rng.integers(3, vocab, length).tolist())
        m = (rng.random(length) < (0.15 + 0.1 * i)).astype(int)
        masks.append(m.tolist())
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "loss_mask": masks})


def _args(tmp_path, **kw) -> SelectiveLossConfig:
    base = dict(
        output_dir=str(tmp_path / "ck"),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return SelectiveLossConfig(**base)


def manual_masked_ce(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    return ce / (labels[:, 1:] != -100).sum()


def test_labels_fold_mask_padding_and_first_position():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = labels_from_loss_mask(ids, mask, attn)
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]


def test_labels_leave_the_callers_boolean_mask_unchanged():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[True, True, False, True]])
    attn = torch.tensor([[1, 1, 1, 0]])
    labels = labels_from_loss_mask(ids, mask, attn)
    assert labels.tolist() == [[-100, 6, -100, -100]]
    assert mask.tolist() == [[True, True, False, True]]


def test_collator_pads_right_and_counts_trained_tokens(tiny_llama):
    _, tok = tiny_llama
    col = SelectiveLossCollator(tok.pad_token_id, pad_to_multiple_of=8)
    batch = col([{"input_ids": [4, 5, 6], "loss_mask": [1, 1, 0]}, {"input_ids": [7, 8], "loss_mask": [0, 1]}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist()[1][:3] == [1, 1, 0]
    assert (batch["labels"] != -100).sum() == 2  # [5] in row 0 (token 4 is position 0), [8] in row 1


@pytest.fixture
def small_chunks(monkeypatch):
    """The chunked backend's chunks hold 3 rows of logits: every batch spans many chunks."""
    import forgetful.nll_kernels as kernels

    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 3 * 400)


BACKENDS = ["dense", "chunked", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_equals_manual_masked_cross_entropy(tiny_llama, tmp_path, backend, small_chunks):
    model, tok = tiny_llama
    model = copy.deepcopy(model).float()
    ds = _dataset(len(tok))
    args = _args(tmp_path, loss_backend=backend)
    trainer = SelectiveLossTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator(ds.to_list())
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        ref = manual_masked_ce(model, batch)
        dense = SelectiveLossTrainer(
            model=model, args=_args(tmp_path, sparse_logits=False), train_dataset=ds, processing_class=tok
        ).compute_loss(model, dict(batch))
    assert torch.allclose(loss, ref, atol=1e-6, rtol=0)
    assert torch.allclose(dense, ref, atol=1e-6, rtol=0)


def _one_sgd_step(model, tok, ds, tmp_path, batch, accum, backend="dense", **kw):
    m = copy.deepcopy(model).float()
    args = _args(
        tmp_path,
        loss_backend=backend,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        **kw,
    )
    SelectiveLossTrainer(model=m, args=args, train_dataset=ds, processing_class=tok).train()
    return {k: v.detach().clone() for k, v in m.named_parameters()}


@pytest.mark.parametrize("backend", ["dense", "chunked"])
def test_gradient_accumulation_is_exact(tiny_llama, tmp_path, backend, small_chunks):
    """batch 8 x accumulation 1 == batch 2 x accumulation 4 == the gradient of the global mean."""
    model, tok = tiny_llama
    ds = _dataset(len(tok))
    before = {k: v.detach().clone().float() for k, v in model.named_parameters()}
    a = _one_sgd_step(model, tok, ds, tmp_path / "a", 8, 1, backend)
    b = _one_sgd_step(model, tok, ds, tmp_path / "b", 2, 4, backend)
    # the manual reference: one SGD step of lr 1 on the masked mean over all 8 rows
    ref_model = copy.deepcopy(model).float()
    batch = SelectiveLossCollator(tok.pad_token_id)(ds.to_list())
    manual_masked_ce(ref_model, batch).backward()
    for name, p in ref_model.named_parameters():
        expected = before[name] - p.grad
        assert torch.allclose(a[name], expected, atol=1e-5, rtol=0), name
        assert torch.allclose(b[name], a[name], atol=1e-5, rtol=0), name
    # and the updates are not trivially zero
    assert max((a[n] - before[n]).abs().max() for n in a) > 1e-4


def test_micro_batch_average_is_the_mean_of_micro_batch_means(tiny_llama, tmp_path):
    """loss_average="micro_batch" (the HF model loss open-unlearning trains with): batch 2 x
    accumulation 4 steps on the mean of the four micro-batches' masked means."""
    model, tok = tiny_llama
    ds = _dataset(len(tok))
    before = {k: v.detach().clone().float() for k, v in model.named_parameters()}
    got = _one_sgd_step(model, tok, ds, tmp_path / "mb", 2, 4, loss_average="micro_batch")
    ref_model = copy.deepcopy(model).float()
    rows = ds.to_list()
    collate = SelectiveLossCollator(tok.pad_token_id)
    loss = sum(manual_masked_ce(ref_model, collate(rows[i : i + 2])) for i in range(0, 8, 2)) / 4
    loss.backward()
    for name, p in ref_model.named_parameters():
        assert torch.allclose(got[name], before[name] - p.grad, atol=1e-5, rtol=0), name
    tokens = _one_sgd_step(model, tok, ds, tmp_path / "tk", 2, 4)
    assert max((got[n] - tokens[n]).abs().max() for n in got) > 1e-5  # not the global token mean


def test_warmup_epochs_as_open_unlearning_counts_them(tiny_llama, tmp_path):
    model, tok = tiny_llama
    ds = _dataset(len(tok), n=8)
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_epochs=1.5)
    SelectiveLossTrainer(model=copy.deepcopy(model), args=args, train_dataset=ds, processing_class=tok)
    assert args.warmup_steps == int((1.5 * 8) // 4) == 3
    with pytest.raises(ForgetfulError, match="loss_average must be one of tokens, micro_batch"):
        _args(tmp_path, loss_average="rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_batch_gives_zero_loss_and_zero_gradients(tiny_llama, tmp_path, backend):
    model, tok = tiny_llama
    model = copy.deepcopy(model).float()
    ds = _dataset(len(tok), n=2)
    args = _args(tmp_path, loss_backend=backend)
    trainer = SelectiveLossTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    rows = [{"input_ids": r["input_ids"], "loss_mask": [0] * len(r["input_ids"])} for r in ds.to_list()]
    batch = trainer.data_collator(rows)
    for num_items in (None, torch.tensor(0)):
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().max() == 0 for g in grads)


def test_auto_backend_is_chunked_on_the_cpu(tiny_llama, tmp_path, monkeypatch):
    import forgetful.nll_kernels as kernels

    model, tok = tiny_llama
    ds = _dataset(len(tok), n=2)
    trainer = SelectiveLossTrainer(model=model, args=_args(tmp_path), train_dataset=ds, processing_class=tok)
    assert trainer.args.loss_backend == trainer.loss_backend == "auto"
    calls = []
    real = kernels.ChunkedLinearNLL.apply
    monkeypatch.setattr(kernels.ChunkedLinearNLL, "apply", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        trainer.compute_loss(model, dict(trainer.data_collator(ds.to_list())))
    assert calls == [1]


@pytest.mark.parametrize("backend", ["cce", "liger"])
def test_gpu_backends_are_refused_on_the_cpu_before_training(tiny_llama, tmp_path, backend):
    with pytest.raises(ForgetfulError, match=f"loss_backend='{backend}' runs only on a CUDA GPU") as err:
        _args(tmp_path, loss_backend=backend)
    assert "\n" not in str(err.value)
    model, tok = tiny_llama
    args = _args(tmp_path)
    args.loss_backend = backend  # changed after the config's check: the Trainer checks again
    with pytest.raises(ForgetfulError, match=f"loss_backend='{backend}' runs only on a CUDA GPU"):
        SelectiveLossTrainer(model=model, args=args, train_dataset=_dataset(len(tok), n=2), processing_class=tok)


def test_bad_backend_options_are_refused(tmp_path):
    with pytest.raises(ForgetfulError, match="loss_backend must be one of"):
        _args(tmp_path, loss_backend="fast")
    with pytest.raises(ForgetfulError, match="sparse_logits=False"):
        _args(tmp_path, loss_backend="chunked", sparse_logits=False)


def test_use_liger_kernel_with_another_backend_is_refused_naming_loss_backend(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(ForgetfulError, match="use_liger_kernel.*loss_backend='chunked'") as err:
        _args(tmp_path, loss_backend="chunked", use_liger_kernel=True)
    assert "\n" not in str(err.value)
    args = _args(tmp_path, loss_backend="chunked")
    args.use_liger_kernel = True  # set after the config's own check: the Trainer checks again
    with pytest.raises(ForgetfulError, match="use_liger_kernel.*loss_backend='chunked'"):
        SelectiveLossTrainer(model=model, args=args, train_dataset=_dataset(len(tok), n=2), processing_class=tok)


def test_use_liger_kernel_without_liger_or_cuda_is_refused_in_one_line(tmp_path):
    with pytest.raises(ForgetfulError, match="loss_backend='liger' runs only on a CUDA GPU"):
        _args(tmp_path, use_liger_kernel=True)


def test_use_liger_kernel_is_honoured_through_the_liger_backend(tiny_llama, tmp_path, monkeypatch):
    """The selective loss bypasses the model's own loss, so --use_liger_kernel must not be silently
    ignored: Liger's fused linear cross-entropy computes the trained tokens' NLL (a CPU stand-in for
    its CUDA forward here), with the gradients in the forward (the loss is a sum over a count)."""
    import transformers.trainer

    import forgetful.nll_backends as lk

    calls = install_liger_stand_in(monkeypatch)
    monkeypatch.setattr(lk, "cuda_usable", lambda device: True)
    monkeypatch.setattr(lk, "kernel_available", lambda name: True)
    patched = []
    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", lambda model, cfg: patched.append(model))

    model, tok = tiny_llama
    model = copy.deepcopy(model).float()
    ds = _dataset(len(tok))
    args = _args(tmp_path, use_liger_kernel=True, max_steps=1, per_device_train_batch_size=4)
    trainer = SelectiveLossTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    assert trainer.loss_backend == "liger"
    trainer.train()
    assert patched == [model] and len(calls) == 1  # the Trainer applied Liger; the loss went through it
    assert calls[0]["compute_gradients"] and calls[0]["accum_dtype"] is torch.float32  # summed: one pass
    batch = trainer.data_collator(ds.to_list())
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        ref = manual_masked_ce(model, batch)
    assert len(calls) == 2 and not calls[1]["compute_gradients"]  # no gradient asked for, none computed
    assert torch.allclose(loss, ref, atol=1e-6, rtol=1e-6), (loss, ref)


def test_loss_mask_survives_remove_unused_columns(tiny_llama, tmp_path):
    model, tok = tiny_llama
    ds = _dataset(len(tok)).add_column("extra_text", ["x"] * 8)
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=4, remove_unused_columns=True)
    trainer = SelectiveLossTrainer(model=copy.deepcopy(model), args=args, train_dataset=ds, processing_class=tok)
    seen = []
    inner = trainer.data_collator

    def spy(rows):
        seen.append(set(rows[0]))
        return inner(rows)

    trainer.data_collator = spy
    trainer.train()
    assert seen and all("loss_mask" in keys and "extra_text" not in keys for keys in seen)


@pytest.mark.parametrize(
    "rows, fragment",
    [
        ({"input_ids": [[4, 5, 6]]}, "loss_mask"),
        ({"input_ids": [[4, 5, 6]], "loss_mask": [[1, 1]]}, "length 2 but input_ids has 3"),
        ({"input_ids": [[4, 5, 6]], "loss_mask": [[1, 2, 0]]}, "only 0 and 1"),
        ({"input_ids": [[4, 5, 6]], "loss_mask": [[1, 0.5, 0]]}, "only 0 and 1"),
        ({"input_ids": [[]], "loss_mask": [[]]}, "empty"),
    ],
)
def test_bad_loss_masks_fail_before_training(tiny_llama, tmp_path, rows, fragment):
    model, tok = tiny_llama
    with pytest.raises(ForgetfulError, match=fragment):
        SelectiveLossTrainer(
            model=model, args=_args(tmp_path), train_dataset=Dataset.from_dict(rows), processing_class=tok
        )


def test_checkpoints_are_marked_complete_and_resume_picks_the_newest(tiny_llama, tmp_path):
    from forgetful.training.checkpoints import checkpoints, latest_trainer_checkpoint

    model, tok = tiny_llama
    ds = _dataset(len(tok), n=16)
    args = _args(
        tmp_path, max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2, save_total_limit=1
    )
    SelectiveLossTrainer(model=copy.deepcopy(model), args=args, train_dataset=ds, processing_class=tok).train()
    found = checkpoints(tmp_path / "ck")
    assert [s for s, _ in found] == [4]  # rotated to one, and it is complete
    (tmp_path / "ck" / "checkpoint-6").mkdir()  # a half-written checkpoint (no marker)
    assert latest_trainer_checkpoint(tmp_path / "ck").endswith("checkpoint-4")


def test_train_selective_with_lora_and_tensorboard(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("tensorboard")
    from forgetful.cli import main

    out = tmp_path / "lora"
    rc = main(
        [
            "train-selective",
            "--task",
            "tofu",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--num-authors",
            "3",
            "--strategy",
            "forget_facts",
            "--forget-split",
            "forget10",
            "--lora",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--report_to",
            "tensorboard",
            "--logging_steps",
            "1",
        ]
    )
    assert rc == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "config.json").is_file() and (out / "results.json").is_file()
    assert any((out / "checkpoints").rglob("events.out.tfevents*"))  # output_dir/runs/...
