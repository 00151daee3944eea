"""Bad input through the CLI: exit code 2, one line on stderr naming the problem, no traceback,
and no output folder left that looks complete (no results.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from forgetful.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir, tiny_llama):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("\n   \n\n")
    (d / "short.txt").write_text("just a few words here\n")
    (d / "bad.yaml").write_text("block_size: 64\nnot_an_option: 3\n")
    (d / "badtype.yaml").write_text("max_steps: lots\n")
    (d / "broken.yaml").write_text("max_steps: [1, 2\n")
    (d / "notmap.yaml").write_text("- a\n- b\n")
    (d / "empty_target.jsonl").write_text(json.dumps({"context": "Some context here.", "target": ""}) + "\n")
    (d / "qa.jsonl").write_text(
        "".join(json.dumps({"context": f"Fact number {i} is here.", "target": f" {i}"}) + "\n" for i in range(8))
    )
    (d / "corrupt.json").write_text('{"text": "ok"}\n{"text": broken\n')
    # a policy folder with a corrupt config, and one trained for another embedding size
    (d / "bad_policy").mkdir()
    (d / "bad_policy" / "policy_config.json").write_text("{not json")
    (d / "bad_policy" / "policy.safetensors").write_bytes(b"\0" * 16)
    from conftest import make_tiny

    from forgetful.input.policies import MLPForgetMask

    other, _ = make_tiny("tiny-llama", hidden=48)
    MLPForgetMask(other, hidden_size=8).save_pretrained(d / "other_policy")
    # a model whose tokenizer is larger than its embedding table
    model, tok = tiny_llama
    small = make_tiny("tiny-llama", vocab_size=300)[0]
    small.save_pretrained(d / "mismatch")
    tok.save_pretrained(d / "mismatch")
    # a model folder with corrupt weights
    (d / "corrupt_model").mkdir()
    (d / "corrupt_model" / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    (d / "corrupt_model" / "model.safetensors").write_bytes(b"garbage" * 10)
    # TOFU folders: one missing splits, plus retain results of another split / another size
    (d / "tofu_missing").mkdir()
    (d / "tofu_missing" / "full.json").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (d / "retain_other_split.json").write_text(
        json.dumps({"meta": {"forget_split": "forget05"}, "forget": {"truth_ratio": [1.0], "question": ["q"]}})
    )
    (d / "retain_rows.json").write_text(
        json.dumps(
            {
                "meta": {"forget_split": "forget10"},
                "forget": {"truth_ratio": [1.0, 2.0, 3.0], "question": ["q", "r", "s"]},
            }
        )
    )
    # retain results of the same split and questions, made with another tokenizer / template
    from forgetful.data.tofu import load_tofu_split, write_tofu_folder

    questions = [r["question"] for r in load_tofu_split(None, "forget10_perturbed", num_authors=3)[:2]]
    (d / "retain_other_tokenizer.json").write_text(
        json.dumps(
            {
                "meta": {"forget_split": "forget10", "encoding": "0123456789abcdef", "template": "chat"},
                "forget": {"truth_ratio": [1.0, 2.0], "question": questions},
            }
        )
    )
    # a TOFU folder whose forget split has no perturbed file
    write_tofu_folder(d / "tofu_no_perturbed", num_authors=3)
    (d / "tofu_no_perturbed" / "forget10_perturbed.json").unlink()
    # a checkpoint marked complete whose state is corrupt
    ck = d / "run_corrupt" / "checkpoint-2"
    ck.mkdir(parents=True)
    (ck / "forget_trainer_state.json").write_text("{truncated")
    (ck / "COMPLETE").write_text("ok\n")
    return d


def _cases(d: Path, model: str):
    """(argv, expected message fragment)."""
    pre = ["pretrain", "--out", str(d / "out_pretrain")]
    fg = [
        "train-forget",
        "--model",
        model,
        "--out",
        str(d / "out_forget"),
        "--max-steps-per-epoch",
        "1",
        "--batch-size",
        "2",
        "--num-samples",
        "2",
        "--embedded-examples",
        "8",
        "--eval-examples",
        "4",
    ]
    ev = ["eval-forget", "--model", model, "--out", str(d / "out_eval"), "--max-examples", "4"]
    tofu = ["eval-tofu", "--model", model, "--out", str(d / "out_tofu"), "--num-authors", "3", "--max-examples", "2"]
    sel = ["train-selective", "--model", model, "--out", str(d / "out_sel"), "--max_steps", "1"]
    unl = ["unlearn", "--model", model, "--out", str(d / "out_unlearn"), "--num-authors", "3", "--max_steps", "1"]
    exp = ["tofu-experiment", "--model", model, "--out", str(d / "out_exp"), "--num-authors", "3", "--max_steps", "1"]
    return [
        (["no-such-command"], "unknown command"),
        (pre + ["--train-file", str(d / "missing.txt")], "data file not found"),
        (pre + ["--train-file", str(d / "empty.txt")], "data file is empty"),
        (pre + ["--train-file", str(d / "blank.txt")], "has no non-blank text"),
        (
            pre + ["--train-file", str(d / "short.txt"), "--block-size", "256", "--vocab-size", "300"],
            "fewer than one block",
        ),
        (pre + ["--train-file", str(d / "corrupt.json")], "cannot read json"),
        (pre + ["--model", "no-such-model-anywhere"], "cannot load model 'no-such-model-anywhere'"),
        (
            pre + ["--train-file", "wikitext", "--dataset-config", "wikitext-103-raw-v1"],
            "cannot load dataset 'wikitext",
        ),
        (pre + ["--config", str(d / "bad.yaml")], "unknown config key 'not_an_option'"),
        (pre + ["--config", str(d / "badtype.yaml")], "'max_steps' must be an integer"),
        (pre + ["--config", str(d / "broken.yaml")], "not valid YAML"),
        (pre + ["--config", str(d / "notmap.yaml")], "must be a mapping"),
        (pre + ["--config", str(d / "missing.yaml")], "config file not found"),
        (pre + ["--max-steps", "many"], "invalid int value"),
        (pre + ["--block-size", "0"], "block_size must be at least 1"),
        (pre + ["--bogus-flag", "1"], "not used by the HfArgumentParser"),
        (fg + ["--keep", "1.5"], "keep ratios must lie in (0, 1]"),
        (fg + ["--keep", "0"], "keep ratios must lie in (0, 1]"),
        (fg + ["--exploration", "a,b"], "exploration entries are numbers"),
        (fg + ["--exploration", ","], "exploration is empty"),
        (fg + ["--exploration", "0.5,,0"], "exploration '0.5,,0' has an empty entry"),
        (fg + ["--method", "two_step", "--exploration", "0.5"], "true (LM epoch) or false"),
        (fg + ["--mask", "transformer"], "unknown strategy 'transformer'"),
        (fg + ["--budget", "100000"], "larger than the shortest context"),
        (fg + ["--train-file", str(d / "empty_target.jsonl")], "empty context or target"),
        (fg + ["--train-file", str(d / "short.txt"), "--context-length", "64"], "fewer than one window"),
        (fg + ["--out", str(d / "run_corrupt"), "--resume"], "cannot resume"),
        (["train-forget", "--model", str(d / "missing_model"), "--out", str(d / "o")], "cannot load model"),
        (["train-forget", "--model", str(d / "mismatch"), "--out", str(d / "o")], "vocabulary mismatch"),
        (["train-forget", "--model", str(d / "corrupt_model"), "--out", str(d / "o")], "cannot load model"),
        (ev + ["--keep", "0"], "keep ratios must lie in (0, 1]"),
        (ev + ["--mask-dir", str(d / "bad_policy")], "not valid JSON"),
        (ev + ["--mask-dir", str(d / "other_policy")], "embeddings of size 48"),
        (ev + ["--mask-dir", str(d / "no_policy_here")], "is not a saved policy"),
        (ev + ["--strategies", "identity,transformer"], "takes strategies that are not learned"),
        (ev + ["--strategies", "identity,oracle"], "the oracle searches over units"),
        (ev + ["--strategies", "snapkv:layers=2"], "snapkv has no option layers"),
        (sel + ["--task", "poetry"], "unknown task 'poetry'"),
        (sel + ["--task", "text", "--mask", "random", "--p", "1.0", "--block-size", "32"], "all zeros"),
        (sel + ["--task", "tofu", "--strategy", "forget_everything"], "unknown TOFU strategy"),
        (sel + ["--task", "tofu", "--fsdp", "full_shard"], "--fsdp shards the model over several processes"),
        (sel + ["--task", "tofu", "--loss_backend", "cce"], "loss_backend='cce' runs only on a CUDA GPU"),
        (sel + ["--task", "tofu", "--loss_backend", "fast"], "invalid choice: 'fast'"),
        (sel + ["--task", "tofu", "--loss_backend", "dense", "--use_liger_kernel"], "loss_backend='dense'"),
        (fg + ["--loss-backend", "liger"], "loss_backend='liger' runs only on a CUDA GPU"),
        (tofu + ["--data-dir", str(d / "tofu_missing")], "is missing"),
        (tofu + ["--retain-eval", str(d / "retain_other_split.json")], "are for forget05"),
        (tofu + ["--retain-eval", str(d / "retain_rows.json")], "row counts do not match"),
        (tofu + ["--forget-split", "forget42"], "forget split must be one of"),
        (tofu + ["--retain-eval", str(d / "retain_other_tokenizer.json")], "another tokenizer or prompt template"),
        (tofu + ["--data-dir", str(d / "tofu_no_perturbed")], "forget10_perturbed' is missing"),
        (unl + ["--method", "dpo"], "unknown unlearning method 'dpo'; choose from grad_ascent, grad_diff, npo, simnpo"),
        (unl + ["--method", "rmu", "--rmu_layer", "5"], "rmu_layer 5: the model has 2 decoder layers (0..1)"),
        (unl + ["--data-dir", str(d / "tofu_no_perturbed"), "--evaluate"], "needs its perturbed answers"),
        (exp + ["--unlearning", "npo,dpo"], "unknown unlearning method 'dpo'"),
        (exp + ["--data-dir", str(d / "tofu_no_perturbed")], "forget10_perturbed' is missing"),
        (
            exp + ["--recipe", "open-unlearning"],
            "recipe must be one of auto, open_unlearning, smollm2, demo, got 'open-unl",
        ),
        (["demo", "--out", str(d / "out_demo"), "--keep", "1.0"], "keep ratios must lie in (0, 1)"),
    ]


N_CASES = 58  # the parametrisation below runs each case by index


def test_there_are_at_least_twenty_cases(files, tiny_model_dir):
    assert len(_cases(files, str(tiny_model_dir))) == N_CASES >= 20


@pytest.mark.parametrize("index", range(N_CASES))
def test_bad_input_exits_2_with_one_clear_line(index, files, tiny_model_dir, capsys):
    argv, fragment = _cases(files, str(tiny_model_dir))[index]
    rc = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, (argv, captured.err[-2000:])
    assert "Traceback" not in captured.err + captured.out
    assert lines and lines[-1].startswith("forgetful: error: ")
    errors = [line for line in lines if line.startswith("forgetful: error")]
    assert len(errors) == 1
    assert fragment in errors[0], errors[0]
    for flag in ("--out",):
        if flag in argv:
            out = Path(argv[argv.index(flag) + 1])
            assert not (out / "results.json").exists()


def test_the_console_script_itself_reports_one_line(tmp_path):
    """Through a real process: exit status 2, one stderr line, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "forgetful",
            "pretrain",
            "--out",
            str(tmp_path / "o"),
            "--train-file",
            str(tmp_path / "nope.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err == [f"forgetful: error: data file not found: {tmp_path / 'nope.txt'}"]
