"""Post-hoc unlearning (forgetful.loss.unlearning, its registry of methods in
forgetful.loss.unlearn, one file per method): each method's loss on one batch against a
hand computation, NPO's value at the reference, the forget/retain pairing, training that lowers the
forget probability on a tiny model, the registry's lookup and defaults, RMU training only its
parameters, and the loss backend reaching every NLL."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from forgetful.errors import ForgetfulError
from forgetful.loss.trainer import SelectiveLossCollator
from forgetful.loss.unlearn import UNLEARNING_METHODS, register_unlearning_method, unlearning_method
from forgetful.loss.unlearn.base import UnlearningMethod
from forgetful.loss.unlearn.npo import NPO, npo_loss
from forgetful.loss.unlearn.rmu import RMU, mean_activation_norm
from forgetful.loss.unlearn.simnpo import SimNPO
from forgetful.loss.unlearning import ForgetRetainDataset, UnlearningConfig, UnlearningTrainer, forget_probability
from forgetful.nll_kernels import ChunkedLinearNLL

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
    with pytest.raises(ForgetfulError, match="retain_loss_type must be one of NLL, KL, EMBED_DIFF"):
        _args(tmp_path, retain_loss_type="L2")
    with pytest.raises(ForgetfulError, match="unlearning averages each micro-batch's loss.*got loss_average 'tokens'"):
        _args(tmp_path, loss_average="tokens")
    with pytest.raises(ForgetfulError, match="steering_coeff must be positive, got 0.0"):
        _args(tmp_path, method="rmu", steering_coeff=0.0)
    with pytest.raises(ForgetfulError, match="gamma must not be negative, got -1.0"):
        _args(tmp_path, gamma=-1.0)
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


# Not simnpo at its defaults: its forget gradient is weighted by 2 * (1 - sigmoid(beta * NLL / |y|)), which
# at this model's forget NLL (about 2.3 a token) and beta 4.5 is 3e-5: the toy rows count as forgotten
# already (its loss is checked by hand above).
@pytest.mark.parametrize("method", ["grad_ascent", "grad_diff", "npo", "rmu"])
def test_training_lowers_the_forget_probability(memorized, tmp_path, method):
    full, tok, forget, retain = memorized
    model = copy.deepcopy(full)
    before = forget_probability(model, forget, tok.pad_token_id)
    assert before.mean() > 0.05  # learned (uniform would be 1/400)
    # rmu trains every parameter here (open-unlearning's TOFU configuration): three steps on two MLP matrices
    # (its default, WMDP's) move this toy model too little
    extra = {"rmu_params": ".*"} if method == "rmu" else {}
    args = _args(
        tmp_path,
        method=method,
        **extra,
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


# --------------------------------------------------------------------------------------------------
# The registry, SimNPO and RMU, the loss backend
# --------------------------------------------------------------------------------------------------


def test_registry_lookup_and_unknown_name(tmp_path):
    assert list(UNLEARNING_METHODS) == ["grad_ascent", "grad_diff", "npo", "simnpo", "rmu"]
    assert unlearning_method("npo") is NPO and unlearning_method("simnpo") is SimNPO and unlearning_method("rmu") is RMU
    message = "unknown unlearning method 'dpo'; choose from grad_ascent, grad_diff, npo, simnpo, rmu"
    with pytest.raises(ForgetfulError, match=message):
        unlearning_method("dpo")
    with pytest.raises(ForgetfulError, match=message):
        _args(tmp_path, method="dpo")


def test_one_file_per_method_each_registered_from_its_own_file():
    """loss/unlearn/ holds base.py, __init__.py and exactly one file per registered method, named
    after it; each name maps to a class defined in that file (not imported into it), and no file
    defines a second method class."""
    import ast
    import inspect
    from pathlib import Path

    import forgetful.loss.unlearn as package

    folder = Path(package.__file__).parent
    files = {p.stem for p in folder.glob("*.py")}
    assert files == {"__init__", "base", *UNLEARNING_METHODS}
    for name, cls in UNLEARNING_METHODS.items():
        assert cls.__module__ == f"forgetful.loss.unlearn.{name}" and cls.name == name
        assert Path(inspect.getfile(cls)) == folder / f"{name}.py"
    for name in UNLEARNING_METHODS:
        tree = ast.parse((folder / f"{name}.py").read_text())
        classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
        assert classes == [UNLEARNING_METHODS[name].__name__], (name, classes)


def test_each_method_takes_its_own_defaults(tmp_path):
    def opts(**kw):
        a = _args(tmp_path, **kw)
        return a.beta, a.gamma, a.alpha, a.retain_loss_type

    assert opts(method="npo") == (0.1, 1.0, 1.0, "NLL")
    assert opts(method="grad_diff") == (0.1, 1.0, 1.0, "NLL")
    assert opts(method="simnpo") == (4.5, 0.125, 1.0, "NLL")  # open-unlearning's SimNPO.yaml
    assert opts(method="rmu") == (0.1, 1.0, 1.0, "EMBED_DIFF")  # open-unlearning's RMU.yaml
    a = _args(tmp_path, method="rmu")
    assert (a.steering_coeff, a.steering_scale, a.rmu_layer, a.rmu_params, a.ddp_find_unused_parameters) == (
        2.0,
        None,
        None,
        "wmdp",  # WMDP's MLP output projections of layers L-2..L, resolved by the method
        True,
    )
    assert _args(tmp_path, method="simnpo").delta == 0.0
    assert opts(method="simnpo", beta=2.0, gamma=1.0, retain_loss_type="KL") == (2.0, 1.0, 1.0, "KL")  # given: kept
    with pytest.raises(
        ForgetfulError, match="unlearning method 'npo' takes retain_loss_type NLL, KL, got 'EMBED_DIFF'"
    ):
        _args(tmp_path, method="npo", retain_loss_type="EMBED_DIFF")
    with pytest.raises(ForgetfulError, match=r"rmu_params '\(' is not a regular expression"):
        _args(tmp_path, method="rmu", rmu_params="(")


def test_simnpo_loss_hand_computed(setup):
    model, _, _, _, batch, _ = setup
    with torch.no_grad():
        fs, fn = _ce_per_row(model, batch["forget"])
        rs, rn = _ce_per_row(model, batch["retain"])
    retain_nll = (rs.sum() / rn.sum()).item()
    for kw, (beta, delta, gamma, alpha) in [
        ({}, (4.5, 0.0, 0.125, 1.0)),  # the defaults
        ({"beta": 2.0, "delta": 0.5, "gamma": 0.3, "alpha": 2.0}, (2.0, 0.5, 0.3, 2.0)),
    ]:
        tr = _trainer(setup, method="simnpo", **kw)
        with torch.no_grad():
            loss, parts = tr.compute_loss(model, batch, return_outputs=True)
        x = beta * (fs.double() / fn - delta)  # float64: log sigmoid of a large x is a small number
        forget = (-(2 / beta) * torch.log(1 / (1 + torch.exp(-x)))).mean().item()
        assert parts["forget_loss"].item() == pytest.approx(forget, rel=1e-5)
        assert parts["retain_loss"].item() == pytest.approx(retain_nll, rel=1e-5)
        assert loss.item() == pytest.approx(gamma * forget + alpha * retain_nll, rel=1e-5)


def test_simnpo_fitted_delta_is_the_mean_forget_nll_per_token(setup):
    """delta 'fitted': the mean over every forget row of its NLL per trained token before unlearning,
    by hand; the loss then uses it; a delta that is neither a number nor 'fitted' is refused."""
    model, tok, forget, _, batch, tmp_path = setup
    with torch.no_grad():
        s, n = _ce_per_row(model, SelectiveLossCollator(tok.pad_token_id)(forget.to_list()))
        fs, fn = _ce_per_row(model, batch["forget"])
    fitted = (s / n).mean().item()
    tr = _trainer(setup, method="simnpo", delta="fitted")
    assert tr.args.delta == "fitted" and tr.method.delta == pytest.approx(fitted, rel=1e-5)
    assert tr.method.state() == {"delta": pytest.approx(fitted, rel=1e-5)}
    with torch.no_grad():
        parts = tr.compute_loss(model, batch, return_outputs=True)[1]
    x = 4.5 * (fs.double() / fn - fitted)
    assert parts["forget_loss"].item() == pytest.approx((-(2 / 4.5) * F.logsigmoid(x)).mean().item(), rel=1e-5)
    assert _trainer(setup, method="simnpo", delta="0.25").method.delta == 0.25
    with pytest.raises(ForgetfulError, match="delta must be a number or 'fitted'.*got 'fit'"):
        _args(tmp_path, method="simnpo", delta="fit")


def test_adaptive_rmu_scale_is_the_hand_measured_activation_norm(setup):
    """steering_scale c: the target's norm is c times the mean Euclidean norm of the steered
    layer's output over every forget row's trained tokens (measured by hand from the model's
    hidden states), the forget loss steers to it; steering_coeff is then unused."""
    model, tok, forget, _, batch, _ = setup
    with torch.no_grad():
        rows = SelectiveLossCollator(tok.pad_token_id)(forget.to_list())
        h = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], output_hidden_states=True)
        norms = h.hidden_states[1].norm(dim=-1)[rows["labels"] != -100]  # layer 0's output at the answer tokens
    hand = norms.mean().item()
    assert norms.numel() == sum(sum(m) for m in forget["loss_mask"])
    assert mean_activation_norm(model, forget, 0, pad_id=tok.pad_token_id, batch_size=4) == pytest.approx(
        hand, rel=1e-5
    )
    tr = _trainer(setup, method="rmu", rmu_layer=0, steering_scale=3.0, steering_coeff=100.0)
    assert tr.method.activation_norm == pytest.approx(hand, rel=1e-5)
    assert tr.method.control.norm().item() == pytest.approx(3.0 * hand, rel=1e-5)
    assert tr.method.state()["steering_coeff"] == pytest.approx(3.0 * hand, rel=1e-5)
    with torch.no_grad():
        parts = tr.compute_loss(model, batch, return_outputs=True)[1]
        fb = batch["forget"]
        hb = model(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"], output_hidden_states=True)
        forget_loss = _hand_rmu_distance(
            hb.hidden_states[1], tr.method.control.expand_as(hb.hidden_states[1]), fb["labels"]
        )
    assert parts["forget_loss"].item() == pytest.approx(forget_loss, rel=1e-5)
    # fixed (open-unlearning's): no measurement, the coefficient itself
    fixed = _trainer(setup, method="rmu", rmu_layer=0, steering_coeff=5.0).method
    assert fixed.activation_norm is None and fixed.control.norm().item() == pytest.approx(5.0)
    assert "activation_norm" not in fixed.state()
    with pytest.raises(ForgetfulError, match="steering_scale must be positive"):
        _args(setup[-1], method="rmu", steering_scale=0.0)


def _hand_rmu_distance(h: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> float:
    """Per row: the mean over the answer tokens of the mean squared difference over the hidden
    units; then the mean over rows."""
    rows = []
    for i in range(h.shape[0]):
        keep = labels[i] != -100
        rows.append(((h[i][keep] - target[i][keep]) ** 2).mean(-1).mean())
    return torch.stack(rows).mean().item()


def test_rmu_loss_hand_computed(setup):
    model, _, _, _, batch, _ = setup
    fb, rb = batch["forget"], batch["retain"]
    tr = _trainer(setup, method="rmu", rmu_layer=0, steering_coeff=3.0, alpha=5.0, gamma=0.5)
    d = model.config.hidden_size
    u = torch.rand(d, generator=torch.Generator().manual_seed(0))
    c_u = 3.0 * u / torch.linalg.vector_norm(u)  # c * u, u a unit vector drawn with the run's seed
    assert torch.allclose(tr.method.control, c_u) and tr.method.control.norm().item() == pytest.approx(3.0)
    with torch.no_grad():
        loss, parts = tr.compute_loss(model, batch, return_outputs=True)
        h = model(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"], output_hidden_states=True)
        forget = _hand_rmu_distance(h.hidden_states[1], c_u.expand_as(h.hidden_states[1]), fb["labels"])
    assert parts["forget_loss"].item() == pytest.approx(forget, rel=1e-5)
    assert parts["retain_loss"].item() == pytest.approx(0.0, abs=1e-10)  # the model is its reference
    assert loss.item() == pytest.approx(0.5 * forget, rel=1e-5)
    # against a moved reference: the retain tokens' distance to its layer-0 states
    with torch.no_grad():
        for p in tr.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        loss, parts = tr.compute_loss(model, batch, return_outputs=True)
        cur = model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"], output_hidden_states=True)
        ref = tr.ref_model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"], output_hidden_states=True)
        retain = _hand_rmu_distance(cur.hidden_states[1], ref.hidden_states[1], rb["labels"])
    assert retain > 1e-4 and parts["retain_loss"].item() == pytest.approx(retain, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * forget + 5.0 * retain, rel=1e-5)


def test_rmu_layer_default_fallback_and_errors(setup):
    tr = _trainer(setup, method="rmu")
    assert tr.method.layer == 1  # open-unlearning's layer 7 does not exist in 2 layers: the last one
    # by default WMDP's parameters: the MLP output projections of layers L-2..L (here 0..1)
    down = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert tr.method.trainable == down and tr.method.state()["layer"] == 1
    assert tr.method.state()["trainable_parameters"] == 2 and re.fullmatch(tr.method.state()["rmu_params"], down[0])
    assert [n for n, p in tr.model.named_parameters() if p.requires_grad] == down
    assert _trainer(setup, method="rmu", rmu_layer=0).method.trainable == down[:1]
    setup[0].requires_grad_(True)  # the method froze the rest of the shared model
    assert _trainer(setup, method="rmu", rmu_params=".*").method.state()["trainable_parameters"] == len(
        list(tr.model.parameters())
    )
    with pytest.raises(ForgetfulError, match=r"rmu_layer 2: the model has 2 decoder layers \(0..1\)"):
        _trainer(setup, method="rmu", rmu_layer=2)
    with pytest.raises(ForgetfulError, match="rmu_params 'encoder.*' matches no trainable parameter name"):
        _trainer(setup, method="rmu", rmu_params="encoder.*")
    for unreached in (r"model\.layers\.1\..*", r"model\.norm\.weight"):  # after layer 0; the final norm
        with pytest.raises(ForgetfulError, match="matches only parameters RMU's loss never reaches"):
            _trainer(setup, method="rmu", rmu_layer=0, rmu_params=unreached)
    # a frozen parameter (a PEFT model's base weight) stays frozen, whatever the pattern
    embedding = setup[0].model.embed_tokens.weight.requires_grad_(False)
    tr = _trainer(setup, method="rmu", rmu_params=".*")
    assert not embedding.requires_grad and "model.embed_tokens.weight" not in tr.method.trainable
    assert len(tr.method.trainable) == len(list(setup[0].parameters())) - 1


def _train_rmu(setup, **kw) -> tuple[dict, float, float]:
    """RMU at layer 0 for 4 steps from a copy of the tiny model: (the names of the parameters that
    changed, the forget loss of one batch before, after)."""
    model, tok, forget, retain, batch, tmp_path = setup
    model = copy.deepcopy(model)
    args = _args(tmp_path, method="rmu", rmu_layer=0, learning_rate=1e-2, max_steps=4, warmup_epochs=0.0, **kw)
    tr = UnlearningTrainer(model=model, args=args, forget_dataset=forget, retain_dataset=retain, processing_class=tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        loss_before = tr.compute_loss(model, batch, return_outputs=True)[1]["forget_loss"].item()
    tr.train()
    with torch.no_grad():
        loss_after = tr.compute_loss(model, batch, return_outputs=True)[1]["forget_loss"].item()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    return changed, loss_before, loss_after


def test_rmu_trains_only_its_parameters_and_its_forget_loss_falls(setup):
    changed, before, after = _train_rmu(setup, rmu_params=r"model\.layers\.0\.mlp\.down_proj\.weight")
    assert changed == ["model.layers.0.mlp.down_proj.weight"]
    assert after < before  # one matrix moves the layer's output a little (0.1257 -> 0.1243)
    # every parameter (open-unlearning's TOFU configuration): those up to the steered layer move, the later
    # layer's do not (the loss never reaches them), and the forget loss falls fast
    changed, before, after = _train_rmu(setup, rmu_params=".*")
    assert "model.embed_tokens.weight" in changed and "model.layers.0.mlp.down_proj.weight" in changed
    assert not [n for n in changed if n.startswith("model.layers.1.") or n == "model.norm.weight"]
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("method", ["grad_ascent", "grad_diff", "npo", "simnpo"])
def test_the_loss_backend_computes_every_nll(setup, monkeypatch, method):
    """chunked (and auto, which is chunked on the CPU) runs the chunked kernel for the forget and
    retain NLL (and NPO's reference); dense never does; the values agree."""
    model, _, _, _, batch, _ = setup
    calls = []
    real = ChunkedLinearNLL.apply
    monkeypatch.setattr(ChunkedLinearNLL, "apply", lambda *a: calls.append(1) or real(*a))
    values = {}
    for backend in ("dense", "chunked", "auto"):
        calls.clear()
        tr = _trainer(setup, method=method, loss_backend=backend)
        built = len(calls)  # NPO's reference NLL, computed when the trainer is built
        with torch.no_grad():
            values[backend] = tr.compute_loss(model, batch, return_outputs=True)[1]
        parts = 1 if method == "grad_ascent" else 2
        assert (built, len(calls) - built) == ((0, 0) if backend == "dense" else (int(method == "npo"), parts))
    for backend in ("chunked", "auto"):
        for key, value in values["dense"].items():
            assert values[backend][key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), (backend, key)


def test_npo_reference_nll_through_the_backend(setup):
    dense = _trainer(setup, method="npo", loss_backend="dense").ref_nll
    chunked = _trainer(setup, method="npo", loss_backend="chunked").ref_nll
    assert torch.allclose(dense, chunked, rtol=1e-5) and not math.isclose(dense.sum().item(), 0.0)


def test_a_registered_method_is_looked_up_by_the_trainer(setup, tmp_path):
    """The registry is the only list: a method registered by a user trains under its name."""

    @register_unlearning_method("forget_nll_squared", gamma=2.0)
    class Squared(UnlearningMethod):
        paper = "a test"

        def forget_loss(self, model, inputs):
            return -(self.trainer.batch_nll(model, inputs["forget"]).mean() ** 2)

    try:
        model, _, _, _, batch, _ = setup
        tr = _trainer(setup, method="forget_nll_squared")
        assert isinstance(tr.method, Squared) and tr.args.gamma == 2.0
        with torch.no_grad():
            loss, parts = tr.compute_loss(model, batch, return_outputs=True)
            fs, fn = _ce_per_row(model, batch["forget"])
            rs, rn = _ce_per_row(model, batch["retain"])
        expected = 2.0 * -((fs.sum() / fn.sum()) ** 2) + (rs.sum() / rn.sum())
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    finally:
        del UNLEARNING_METHODS["forget_nll_squared"]
