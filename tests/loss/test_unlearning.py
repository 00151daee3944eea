"""Post-hoc unlearning (forgetful.loss.unlearning): each method's loss on one batch against a hand
computation, NPO's value at the reference, the forget/retain pairing, and training that lowers
the forget probability on a tiny model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from forgetful.errors import ForgetfulError
from forgetful.loss.trainer import SelectiveLossCollator
from forgetful.loss.unlearning import (
    ForgetRetainDataset,
    UnlearningConfig,
    UnlearningTrainer,
    forget_probability,
    npo_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(vocab: int, n: int, seed: int) -> Dataset:
    """Rows like TOFU's: a prompt (unscored) then an answer (scored), lengths differ."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(n):
        p, a = int(rng.integers(3, 7)), int(rng.integers(3, 9))
        ids.append(rng.integers(3, vocab, p + a).tolist())
        masks.append([0] * p + [1] * a)
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "loss_mask": masks})


def _args(tmp_path, **kw) -> UnlearningConfig:
    base = dict(
        output_dir=str(tmp_path / "ck"),
        use_cpu=True,
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
    )
    base.update(kw)
    return UnlearningConfig(**base)


def _ce_per_row(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL per row, trained tokens per row) from full logits, by hand."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return ce.sum(-1), (labels != -100).sum(-1)


@pytest.fixture()
def setup(tiny_llama, tmp_path):
    model, tok = tiny_llama
    model = copy.deepcopy(model).float()
    forget, retain = _rows(len(tok), 6, 0), _rows(len(tok), 10, 1)
    collate = SelectiveLossCollator(tok.pad_token_id)
    fb, rb = collate(forget.to_list()[:4]), collate(retain.to_list()[:4])
    batch = {"forget": fb, "retain": rb, "forget_index": torch.arange(4)}
    return model, tok, forget, retain, batch, tmp_path


def _trainer(setup, **kw):
    model, tok, forget, retain, _, tmp_path = setup
    return UnlearningTrainer(
        model=model, args=_args(tmp_path, **kw), forget_dataset=forget, retain_dataset=retain, processing_class=tok
    )


def test_grad_ascent_loss_is_minus_the_mean_ce(setup):
    model, _, _, _, batch, _ = setup
    tr = _trainer(setup, method="grad_ascent")
    with torch.no_grad():
        loss = tr.compute_loss(model, batch)
        s, n = _ce_per_row(model, batch["forget"])
    assert loss.item() == pytest.approx(-(s.sum() / n.sum()).item(), rel=1e-5)


def test_grad_diff_loss_hand_computed(setup):
    model, _, _, _, batch, _ = setup
    tr = _trainer(setup, method="grad_diff", gamma=0.5, alpha=2.0)
    with torch.no_grad():
        loss, parts = tr.compute_loss(model, batch, return_outputs=True)
        fs, fn = _ce_per_row(model, batch["forget"])
        rs, rn = _ce_per_row(model, batch["retain"])
    forget_nll, retain_nll = (fs.sum() / fn.sum()).item(), (rs.sum() / rn.sum()).item()
    assert parts["forget_loss"].item() == pytest.approx(-forget_nll, rel=1e-5)
    assert parts["retain_loss"].item() == pytest.approx(retain_nll, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * -forget_nll + 2.0 * retain_nll, rel=1e-5)


def test_npo_at_the_reference_is_two_over_beta_log_two(setup):
    """With the model as its own reference, beta * (S_θ - S_ref) = 0 and log sigmoid(0) = -log 2, so
    the forget loss is (2 / beta) log 2 (= 13.863 for beta 0.1), whatever the rows."""
    model, _, _, _, batch, _ = setup
    tr = _trainer(setup, method="npo", beta=0.1, gamma=1.0, alpha=1.0)
    with torch.no_grad():
        loss, parts = tr.compute_loss(model, batch, return_outputs=True)
        rs, rn = _ce_per_row(model, batch["retain"])
    assert parts["forget_loss"].item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    assert 2 / 0.1 * math.log(2) == pytest.approx(13.8629436, rel=1e-8)
    assert loss.item() == pytest.approx(20 * math.log(2) + (rs.sum() / rn.sum()).item(), rel=1e-5)
    # gamma and alpha weigh the parts
    tr2 = _trainer(setup, method="npo", beta=0.5, gamma=0.25, alpha=3.0)
    with torch.no_grad():
        loss2 = tr2.compute_loss(model, batch)
    assert loss2.item() == pytest.approx(0.25 * 4 * math.log(2) + 3.0 * (rs.sum() / rn.sum()).item(), rel=1e-5)


def test_npo_reference_nll_is_the_summed_row_nll_before_training(setup):
    model, _, forget, _, _, _ = setup
    tr = _trainer(setup, method="npo")
    collate = SelectiveLossCollator(0)
    with torch.no_grad():
        s, _ = _ce_per_row(model, collate(forget.to_list()))
    np.testing.assert_allclose(tr.ref_nll.numpy(), s.numpy(), rtol=1e-5)


def test_npo_loss_hand_computed_against_another_reference(setup):
    model, tok, forget, retain, batch, tmp_path = setup
    with torch.no_grad():
        s, _ = _ce_per_row(model, batch["forget"])
    ref = s.numpy() + np.array([-3.0, 0.0, 2.0, 10.0])  # the reference found some rows likelier
    full_ref = np.concatenate([ref, np.zeros(len(forget) - 4)])
    tr = UnlearningTrainer(
        model=model,
        args=_args(tmp_path, method="npo", beta=0.1),
        forget_dataset=forget,
        retain_dataset=retain,
        ref_nll=full_ref,
        processing_class=tok,
    )
    with torch.no_grad():
        _, parts = tr.compute_loss(model, batch, return_outputs=True)
    d = s.numpy() - ref  # S_θ - S_ref per row
    expected = np.mean(-2 / 0.1 * np.log(1 / (1 + np.exp(-0.1 * d))))
    assert parts["forget_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert npo_loss(torch.tensor([0.0]), torch.tensor([0.0]), 0.1).item() == pytest.approx(20 * math.log(2))


def test_kl_retain_loss_is_zero_at_the_reference_and_batchmean(setup):
    model, _, _, _, batch, _ = setup
    tr = _trainer(setup, method="grad_diff", retain_loss_type="KL")
    with torch.no_grad():
        _, parts = tr.compute_loss(model, batch, return_outputs=True)
    assert parts["retain_loss"].item() == pytest.approx(0.0, abs=1e-6)
    # against a perturbed reference: sum over positions of KL(ref || cur) / (batch x length)
    with torch.no_grad():
        for p in tr.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        _, parts = tr.compute_loss(model, batch, return_outputs=True)
        rb = batch["retain"]
        cur = torch.log_softmax(model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits, -1)
        ref = torch.log_softmax(tr.ref_model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits, -1)
        kl = (ref.exp() * (ref - cur)).sum() / (cur.shape[0] * cur.shape[1])
    assert parts["retain_loss"].item() == pytest.approx(kl.item(), rel=1e-4)


def test_forget_retain_pairing(tiny_llama, tmp_path):
    _, tok = tiny_llama
    forget, retain = _rows(len(tok), 5, 0), _rows(len(tok), 50, 1)
    ds = ForgetRetainDataset(forget, retain)
    assert len(ds) == 5  # anchored on the forget set
    torch.manual_seed(0)
    items = [ds[i] for i in range(5)]
    assert [it["forget"]["input_ids"] for it in items] == forget["input_ids"]
    assert [it["forget_index"] for it in items] == list(range(5))
    drawn = [it["retain"]["input_ids"] for it in items]
    assert all(d in retain["input_ids"] for d in drawn) and len({tuple(d) for d in drawn}) > 1
    torch.manual_seed(0)
    assert [ds[i]["retain"]["input_ids"] for i in range(5)] == drawn  # the torch generator decides
    assert "retain" not in ForgetRetainDataset(forget)[0]


def test_unlearning_config_errors(tmp_path, tiny_llama):
    with pytest.raises(
        ForgetfulError, match="unknown unlearning method 'simnpo'; choose from grad_ascent, grad_diff, npo"
    ):
        _args(tmp_path, method="simnpo")
    with pytest.raises(ForgetfulError, match="retain_loss_type must be one of NLL, KL"):
        _args(tmp_path, retain_loss_type="L2")
    model, tok = tiny_llama
    with pytest.raises(ForgetfulError, match="needs a non-empty retain dataset"):
        UnlearningTrainer(
            model=model, args=_args(tmp_path, method="npo"), forget_dataset=_rows(len(tok), 3, 0), processing_class=tok
        )


def test_open_unlearning_recipe_defaults(tmp_path):
    a = UnlearningConfig(output_dir=str(tmp_path), use_cpu=True)
    assert (a.method, a.beta, a.alpha, a.gamma, a.retain_loss_type) == ("npo", 0.1, 1.0, 1.0, "NLL")
    assert (a.learning_rate, a.num_train_epochs, a.weight_decay, a.warmup_epochs) == (1e-5, 10.0, 0.01, 1.0)
    assert a.per_device_train_batch_size * a.gradient_accumulation_steps == 32
    assert a.loss_average == "micro_batch" and a.lr_scheduler_type.value == "linear"


@pytest.fixture(scope="module")
def memorized(tiny_llama, tmp_path_factory):
    """The tiny model finetuned on forget + retain rows until it knows them (the 'full' model)."""
    from forgetful.loss.trainer import SelectiveLossConfig, SelectiveLossTrainer

    model, tok = tiny_llama
    model = copy.deepcopy(model).float()
    forget, retain = _rows(len(tok), 8, 0), _rows(len(tok), 16, 1)
    from datasets import concatenate_datasets

    args = SelectiveLossConfig(
        output_dir=str(tmp_path_factory.mktemp("full")),
        use_cpu=True,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-2,
        num_train_epochs=15,
        per_device_train_batch_size=8,
    )
    SelectiveLossTrainer(
        model=model, args=args, train_dataset=concatenate_datasets([forget, retain]), processing_class=tok
    ).train()
    return model, tok, forget, retain


@pytest.mark.parametrize("method", ["grad_ascent", "grad_diff", "npo"])
def test_training_lowers_the_forget_probability(memorized, tmp_path, method):
    full, tok, forget, retain = memorized
    model = copy.deepcopy(full)
    before = forget_probability(model, forget, tok.pad_token_id)
    assert before.mean() > 0.05  # learned (uniform would be 1/400)
    args = _args(
        tmp_path,
        method=method,
        learning_rate=3e-3,
        num_train_epochs=3,
        warmup_epochs=0.0,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    tr = UnlearningTrainer(model=model, args=args, forget_dataset=forget, retain_dataset=retain, processing_class=tok)
    tr.train()
    after = forget_probability(model, forget, tok.pad_token_id)
    assert tr.state.global_step == 3  # 8 rows / (4 x 2) per step, 3 epochs
    assert after.mean() < 0.75 * before.mean(), (before.mean(), after.mean())
    assert (after < before).all()  # every forget row became less likely
