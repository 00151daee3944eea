"""REINFORCE training of forget policies: runs, freezing, exact resume, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from forgetful.errors import ForgetfulError
from forgetful.input.examples import load_forget_examples
from forgetful.input.policies import MLPForgetMask, RandomForgetMask, RNNForgetMask
from forgetful.input.reinforce import ForgetTrainingConfig, reinforce_model, two_step_reinforce_model


@pytest.fixture(scope="module")
def data(tiny_llama):
    _, tok = tiny_llama
    train = load_forget_examples(None, tok, embedded_examples=24, seed=0)
    held = load_forget_examples(None, tok, embedded_examples=8, seed=99)
    return train, held


def _config(**kw) -> ForgetTrainingConfig:
    base = dict(
        per_device_train_batch_size=4,
        num_samples=2,
        max_steps_per_epoch=2,
        logging_steps=1,
        eval_batches=1,
        disable_tqdm=True,
        learning_rate=1e-3,
        policy_learning_rate=1e-2,
    )
    base.update(kw)
    return ForgetTrainingConfig(**base)


def _state(model, policy):
    out = {f"lm.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    out.update({f"policy.{k}": v.detach().clone() for k, v in policy.state_dict().items()})
    return out


def test_joint_training_returns_model_policy_history(tiny_llama, data):
    model, tok = tiny_llama
    model = copy.deepcopy(model)
    train, held = data
    before = _state(model, MLPForgetMask(model, hidden_size=16))
    policy = MLPForgetMask(model, hidden_size=16)
    p0 = {k: v.clone() for k, v in policy.state_dict().items()}
    m, p, history = reinforce_model(
        model,
        policy,
        forget_p=0.5,
        exploration_epochs=[0.5, 0.0],
        train_dataset=train,
        eval_dataset=held,
        tokenizer=tok,
        args=_config(),
    )
    steps = [h for h in history if "reward" in h]
    evals = [h for h in history if h.get("eval")]
    assert len(steps) == 4 and len(evals) == 2
    assert all(abs(h["keep_ratio"] - 0.5) < 0.05 for h in steps)
    assert all(torch.isfinite(torch.tensor([h["lm_loss"], h["reward"], h["policy_loss"]])).all() for h in steps)
    assert {"eval_policy_nll", "eval_identity_nll", "eval_random_nll", "eval_recency_nll"} <= set(evals[0])
    assert any(not torch.equal(v, before[f"lm.{k}"]) for k, v in m.state_dict().items())
    assert any(not torch.equal(v, p0[k]) for k, v in p.state_dict().items())


def test_chunked_loss_backend_trains_as_dense(tiny_llama, data, monkeypatch):
    """The target NLL (LM loss and reward) through the chunked backend: the same run as dense."""
    import forgetful.nll_kernels as kernels

    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 3 * 400)  # 3 rows of logits per chunk
    model, tok = tiny_llama
    train, _ = data
    runs = {}
    for backend in ("dense", "chunked"):
        torch.manual_seed(0)
        m = copy.deepcopy(model).float()
        policy = MLPForgetMask(m, hidden_size=16)
        m, p, history = reinforce_model(
            m,
            policy,
            forget_p=0.5,
            exploration_epochs=[0.5],
            train_dataset=train,
            tokenizer=tok,
            args=_config(loss_backend=backend, bf16=False),
        )
        runs[backend] = ([h for h in history if "reward" in h], _state(m, p))
    (steps_d, state_d), (steps_c, state_c) = runs["dense"], runs["chunked"]
    assert len(steps_d) == len(steps_c) == 2
    for a, b in zip(steps_d, steps_c):
        for key in ("lm_loss", "reward"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        # normalised advantages magnify float rounding of the rewards
        assert a["policy_loss"] == pytest.approx(b["policy_loss"], rel=1e-3)
    lm = [k for k in state_d if k.startswith("lm.")]  # (Adam on the policy magnifies rounding of tiny gradients)
    assert lm and all(torch.allclose(state_d[k].float(), state_c[k].float(), atol=1e-5) for k in lm)
    with pytest.raises(ForgetfulError, match="loss_backend must be one of"):
        _config(loss_backend="fast")


def test_freeze_lm_trains_only_the_policy(tiny_llama, data):
    model, tok = tiny_llama
    model = copy.deepcopy(model)
    lm0 = {k: v.clone() for k, v in model.state_dict().items()}
    policy = RNNForgetMask(model, hidden_size=16, bidirectional=True)
    p0 = {k: v.clone() for k, v in policy.state_dict().items()}
    m, p, _ = reinforce_model(
        model,
        policy,
        forget_p=0.25,
        exploration_epochs=[0.0],
        train_dataset=data[0],
        tokenizer=tok,
        args=_config(freeze_lm=True, baseline="moving_average"),
    )
    assert all(torch.equal(v, lm0[k]) for k, v in m.state_dict().items())
    assert any(not torch.equal(v, p0[k]) for k, v in p.state_dict().items())


def test_two_step_alternates_what_is_trained(tiny_llama, data):
    model, tok = tiny_llama
    model = copy.deepcopy(model)
    policy = MLPForgetMask(model, hidden_size=16)
    lm0 = {k: v.clone() for k, v in model.state_dict().items()}
    p0 = {k: v.clone() for k, v in policy.state_dict().items()}
    # one LM epoch on random masks: the policy must not move
    m, p, hist = two_step_reinforce_model(
        model, policy, forget_p=0.5, exploration_epochs=[True], train_dataset=data[0], tokenizer=tok, args=_config()
    )
    assert all(torch.equal(v, p0[k]) for k, v in p.state_dict().items())
    assert any(not torch.equal(v, lm0[k]) for k, v in m.state_dict().items())
    assert all("policy_loss" not in h for h in hist)
    # one policy epoch: the LM must not move
    lm1 = {k: v.clone() for k, v in m.state_dict().items()}
    m2, p2, hist2 = two_step_reinforce_model(
        m, p, forget_p=0.5, exploration_epochs=[False], train_dataset=data[0], tokenizer=tok, args=_config()
    )
    assert all(torch.equal(v, lm1[k]) for k, v in m2.state_dict().items())
    assert any(not torch.equal(v, p0[k]) for k, v in p2.state_dict().items())
    assert all("lm_loss" not in h for h in hist2 if "reward" in h)


def test_bernoulli_mode_holds_the_budget_in_expectation(tiny_llama, data):
    model, tok = tiny_llama
    _, _, hist = reinforce_model(
        copy.deepcopy(model),
        MLPForgetMask(model, hidden_size=16),
        forget_p=0.5,
        exploration_epochs=[0.0, 0.0],
        train_dataset=data[0],
        tokenizer=tok,
        args=_config(mode="bernoulli", budget_penalty=50.0, max_steps_per_epoch=3),
    )
    keeps = [h["keep_ratio"] for h in hist if "keep_ratio" in h]
    assert all(0.0 < k < 1.0 for k in keeps)


def test_lm_only_training_with_a_random_mask(tiny_llama, data):
    model, tok = tiny_llama
    m, p, hist = reinforce_model(
        copy.deepcopy(model),
        RandomForgetMask(0.5),
        forget_p=0.5,
        exploration_epochs=[0.0],
        train_dataset=data[0],
        tokenizer=tok,
        args=_config(),
    )
    assert isinstance(p, RandomForgetMask)
    assert all("policy_loss" not in h for h in hist) and any("lm_loss" in h for h in hist)


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_llama, data, tmp_path):
    model, tok = tiny_llama
    train, held = data
    cfg = dict(max_steps_per_epoch=3, save_steps=2, eval_batches=1)

    def run(out, **kw):
        torch.manual_seed(0)
        m = copy.deepcopy(model)
        pol = MLPForgetMask(m, hidden_size=16)
        torch.manual_seed(1)
        return reinforce_model(
            m,
            pol,
            forget_p=0.5,
            exploration_epochs=[0.5, 0.0],
            train_dataset=train,
            eval_dataset=held,
            tokenizer=tok,
            args=_config(output_dir=str(out), **cfg, **kw),
        )

    full = run(tmp_path / "full")
    # interrupted after step 4 (a checkpoint at 4), then resumed in a fresh call
    run(tmp_path / "cut", stop_after_steps=4)
    resumed = run(tmp_path / "cut", resume_from_checkpoint=True)
    a, b = _state(full.model, full.policy), _state(resumed.model, resumed.policy)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Accelerate's state: the LM and the policy (the two trained modules), their optimizers, the RNG
    checkpoint = tmp_path / "cut" / "checkpoint-6"
    for name in ("model.safetensors", "model_1.safetensors", "optimizer.bin", "random_states_0.pkl", "COMPLETE"):
        assert (checkpoint / name).is_file(), name


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"forget_p": 1.0}, "forget_p must lie in"),
        ({"forget_p": -0.1}, "forget_p must lie in"),
        ({"exploration_epochs": []}, "exploration_epochs is empty"),
        ({"exploration_epochs": "0.5"}, "must be a list"),
        ({"exploration_epochs": [1.5]}, "shares of random masks in [0, 1]"),
        ({"exploration_epochs": [True]}, "shares of random masks"),
        ({"args": {"budget": 10_000}}, "larger than the shortest context"),
        ({"args": {"num_samples": 1}}, "num_samples >= 2"),
        ({"args": {"mode": "topk"}}, "mode must be"),
        ({"args": {"per_device_train_batch_size": 64}}, "fewer than one step"),
    ],
)
def test_bad_input_fails_before_training(tiny_llama, data, kwargs, fragment):
    model, tok = tiny_llama
    kw = {"forget_p": 0.5, "exploration_epochs": [0.5], **{k: v for k, v in kwargs.items() if k != "args"}}
    with pytest.raises(ForgetfulError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        reinforce_model(
            model,
            MLPForgetMask(model, hidden_size=8),
            train_dataset=data[0],
            tokenizer=tok,
            args=_config(**kwargs.get("args", {})),
            **kw,
        )


def test_two_step_rejects_non_boolean_epochs(tiny_llama, data):
    model, tok = tiny_llama
    with pytest.raises(ForgetfulError, match="booleans"):
        two_step_reinforce_model(
            model,
            MLPForgetMask(model, hidden_size=8),
            forget_p=0.5,
            exploration_epochs=[0.5],
            train_dataset=data[0],
            tokenizer=tok,
            args=_config(),
        )


def test_dataset_without_forgetting_columns_is_rejected(tiny_llama):
    from datasets import Dataset

    model, tok = tiny_llama
    ds = Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    with pytest.raises(ForgetfulError, match="context_ids and target_ids"):
        reinforce_model(
            model,
            MLPForgetMask(model, hidden_size=8),
            forget_p=0.5,
            exploration_epochs=[0.5],
            train_dataset=ds,
            tokenizer=tok,
            args=_config(),
        )


def test_windows_of_one_length_train_the_same_with_and_without_reading_sizes_back(tiny_llama, tmp_path, monkeypatch):
    """Text windows all have one context and target length: the trainer then knows the kept length
    on the host. The run equals one whose batches do not say so (sizes read back from the device)."""
    import forgetful.input.trainer as reinforce_module
    from forgetful.input.examples import ForgetCollator

    model, tok = tiny_llama
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line {i} of some text about rivers and valleys and the sea" for i in range(200)))
    windows = load_forget_examples(str(text), tok, context_length=24, target_length=4)

    def run():
        torch.manual_seed(0)
        m = copy.deepcopy(model)
        pol = MLPForgetMask(m, hidden_size=16)
        return reinforce_model(
            m, pol, forget_p=0.5, exploration_epochs=[0.5], train_dataset=windows, tokenizer=tok, args=_config()
        )

    hinted = run()

    class Unhinted(ForgetCollator):
        def __call__(self, rows):
            batch = super().__call__(rows)
            assert batch.context_length == 24 and batch.target_length == 4
            batch.context_length = batch.target_length = None
            return batch

    monkeypatch.setattr(reinforce_module, "ForgetCollator", Unhinted)
    plain = run()
    assert [h.get("reward") for h in hinted.history] == [h.get("reward") for h in plain.history]
    for (k, a), b in zip(hinted.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_freeze_policy_trains_the_lm_on_the_policys_greedy_keep_sets(tiny_llama, data, monkeypatch):
    from forgetful.input.policies import ResidualForgetMask

    model, tok = tiny_llama
    model = copy.deepcopy(model)
    base = copy.deepcopy(model)
    torch.manual_seed(0)
    policy = ResidualForgetMask(base, prior="recency", unit="sentence", layer=1, hidden_size=8)
    p0 = {k: v.clone() for k, v in policy.state_dict().items()}
    lm0 = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    greedy = ResidualForgetMask.greedy

    def spy(self, *a, **kw):
        keep = greedy(self, *a, **kw)
        seen.append(keep)
        return keep

    monkeypatch.setattr(ResidualForgetMask, "greedy", spy)
    m, p, hist = reinforce_model(
        model,
        policy,
        forget_p=0.5,
        exploration_epochs=[0.0],
        train_dataset=data[0],
        tokenizer=tok,
        args=_config(freeze_policy=True),
    )
    assert seen and all(torch.equal(v, p0[k]) for k, v in p.state_dict().items())  # the policy never moves
    assert any(not torch.equal(v, lm0[k]) for k, v in m.state_dict().items())
    assert p._base is base  # it still reads the LM it was built on, not the one being finetuned
    assert all("policy_loss" not in h for h in hist) and any("lm_loss" in h for h in hist)
    with pytest.raises(ForgetfulError, match="freeze_policy is for a learned policy"):
        reinforce_model(
            model,
            RandomForgetMask(0.5),
            forget_p=0.5,
            exploration_epochs=[0.0],
            train_dataset=data[0],
            tokenizer=tok,
            args=_config(freeze_policy=True),
        )


def test_keep_best_ends_with_the_policy_that_scored_best(tiny_llama, data):
    from forgetful.input.policies import ResidualForgetMask

    model, tok = tiny_llama
    model = copy.deepcopy(model)  # a frozen LM is left with requires_grad off
    train, held = data
    torch.manual_seed(0)
    policy = ResidualForgetMask(model, prior="lexical", unit="sentence", layer=1, hidden_size=8)
    _, p, hist = reinforce_model(
        model,
        policy,
        forget_p=0.5,
        exploration_epochs=[0.0, 0.0],
        train_dataset=train,
        eval_dataset=held,
        tokenizer=tok,
        args=_config(
            freeze_lm=True, keep_best=True, eval_steps=1, eval_baselines=False, policy_learning_rate=0.3, num_samples=4
        ),
    )
    evals = [h for h in hist if h.get("eval")]
    assert len(evals) == 5 and set(evals[0]) >= {"eval_policy_nll"} and "eval_identity_nll" not in evals[0]
    best = min(evals, key=lambda h: h["eval_policy_nll"])
    assert hist[-1]["best_step"] == best["step"] and hist[-1]["best_eval_nll"] == best["eval_policy_nll"]
    steps = [h for h in hist if "reward" in h]
    assert all({"baseline", "entropy", "answer_kept", "reward"} <= set(h) for h in steps)
    from forgetful.input.evaluation import batches_of, evaluate_strategy

    again = evaluate_strategy(
        model, p, batches_of(held, 4, tok.pad_token_id, 1), keep_ratio=0.5, pad_token_id=tok.pad_token_id
    )
    assert again["nll"] == pytest.approx(best["eval_policy_nll"], abs=1e-6)
