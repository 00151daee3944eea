"""The README's Python example runs as written (with smaller sizes so that it is quick)."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SMALLER = {  # README text -> the same call at test size
    "embedded_examples=2000": "embedded_examples=32",
    "exploration_epochs=[0.75, 0.5, 0.25, 0],": "exploration_epochs=[0.5], max_steps_per_epoch=2, per_device_train_batch_size=4, num_samples=2, disable_tqdm=True,",
    'SelectiveLossConfig(output_dir="runs/ck")': 'SelectiveLossConfig(output_dir="runs/ck", max_steps=2, use_cpu=True)',
}


def test_the_readme_api_example_runs(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    code = re.search(r"```python\n(from forgetful import \(.*?)```", README.read_text(), re.S).group(1)
    for old, new in SMALLER.items():
        assert old in code, f"the README example changed: update SMALLER ({old!r})"
        code = code.replace(old, new)
    work = tmp_path / "work"
    (work / "runs" / "demo").mkdir(parents=True)
    os.symlink(tiny_model_dir, work / "runs" / "demo" / "base")
    (tmp_path / "shared").mkdir()
    os.symlink(shared_data, tmp_path / "shared" / "data")
    monkeypatch.chdir(work)
    monkeypatch.setenv("FORGETFUL_DATA", str(shared_data))  # the README's data names read the data folder
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["short"].input_ids.shape[1] < scope["ids"].shape[1]
    assert scope["deep"].strategy == "snapkv:layer=2@chunk:4"
    assert "Where was Mira born?" in scope["prompt"].text and isinstance(scope["answer"], str)
    assert scope["prompt"].length < scope["prompt"].next_position
    assert scope["out"].logits.shape[:2] == scope["short"].input_ids.shape
    assert (work / "runs" / "mine" / "policy" / "policy.safetensors").is_file()
    assert scope["trainer"].state.global_step == 2
    assert len(scope["history"]) > 0


def _readme_commands() -> list[list[str]]:
    """Every `forgetful <command> ...` of the README's bash blocks, continuation lines joined."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("forgetful ") and "..." not in line:
                commands.append(shlex.split(line)[1:])
    return commands


def test_the_readme_commands_parse_as_written():
    """Each command line of the README names a command and only options it has, with values of the
    right type (run for real, they take a GPU and hours; here they are parsed)."""
    import importlib

    from forgetful.cli import COMMANDS
    from forgetful.cli.parsing import parse_options

    commands = _readme_commands()
    assert len(commands) >= 10
    for argv in commands:
        command, options = argv[0], argv[1:]
        assert command in COMMANDS, command
        module = importlib.import_module(f"forgetful.cli.{COMMANDS[command][0]}")
        parse_options(command, module.ARGUMENTS, options)


def test_the_readme_data_names_load_from_the_data_folder(shared_data, monkeypatch):
    """With FORGETFUL_DATA set, the data the README's commands name loads without a network."""
    from forgetful.data.sources import load_rows
    from forgetful.data.tofu import load_tofu_split

    monkeypatch.setenv("FORGETFUL_DATA", str(shared_data))
    named = {a for argv in _readme_commands() for a in argv if a in ("tofu", "wikitext2:valid", "wikitext2:test")}
    assert named == {"tofu", "wikitext2:valid", "wikitext2:test"}
    assert len(load_tofu_split("tofu", "full")) == 4000
    for name in named - {"tofu"}:
        assert len(load_rows(name)) > 1000


def _quoted_commands(text: str) -> list[list[str]]:
    """``forgetful <command> ...`` quoted inline in a results README or note (placeholders such as
    ``<the GGUF file>`` stand for a path; ``...`` marks a command written in part, left out)."""
    import shlex

    found = []
    for span in re.findall(r"`(forgetful [a-z-]+ [^`]*)`", text):
        if "..." in span or "<" in span and ">" not in span:
            continue
        span = re.sub(r"<[^>]*>", "x", span).replace(" S ", " 0 ").replace("--seed S", "--seed 0")
        found.append(shlex.split(span)[1:])
    return found


def test_the_commands_quoted_in_the_results_readmes_parse():
    """The commands the results folders quote (their READMEs and notes) name a command and only options
    it has (options of earlier releases are read as their new names)."""
    import importlib

    from forgetful.cli import COMMANDS
    from forgetful.cli.parsing import parse_options

    results = README.parent / "benchmarks" / "results"
    commands = [c for path in sorted(results.rglob("*.md")) for c in _quoted_commands(path.read_text())]
    assert len(commands) >= 3
    for argv in commands:
        command, options = argv[0], argv[1:]
        assert command in COMMANDS, command
        module = importlib.import_module(f"forgetful.cli.{COMMANDS[command][0]}")
        parse_options(command, module.ARGUMENTS, options)
