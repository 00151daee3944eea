"""The package layout is part of the design: imports walk down the layers (infrastructure -> models
and data -> input and loss forgetting -> the TOFU benchmark -> the demo -> the CLI), the two halves
of the library do not import each other, no module outside ``cli/`` imports it, and there is no
import cycle. Read from the source with ``ast`` (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "forgetful"

# The layer of each part of the package (by its first name under forgetful).
LAYERS = {
    "errors": 0,
    "atomic": 0,
    "rouge": 0,
    "tokens": 0,
    "reporting": 0,
    "measure": 0,
    "hub": 0,
    "nll": 0,
    "nll_backends": 0,
    "nll_kernels": 0,
    "training": 0,
    "models": 1,
    "data": 1,
    "input": 2,
    "loss": 2,
    "tofu": 3,
    "demo": 4,
    "cli": 5,
    "__main__": 5,
}
# Parts of the same layer that must stay independent.
INDEPENDENT = {("input", "loss"), ("loss", "input"), ("models", "data"), ("data", "models")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every forgetful module that ``path`` imports, resolved to absolute names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "forgetful"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "forgetful":
                continue
            found.add(target)
            for alias in node.names:  # "from . import x" may name a submodule
                candidate = f"{target}.{alias.name}"
                if (SRC.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    SRC.parent / Path(*candidate.split("."))
                ).is_dir():
                    found.add(candidate)
    return found


GRAPH = {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_has_a_layer():
    parts = {_part(m) for m in GRAPH} - {"__init__"}
    assert parts <= set(LAYERS), f"new top-level parts need a layer in this test: {sorted(parts - set(LAYERS))}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _part(m) != "__init__"))
def test_imports_walk_down_the_layers(module):
    src = _part(module)
    for target in GRAPH[module]:
        dst = _part(target)
        if dst == "__init__" or dst == src:
            continue
        assert LAYERS[dst] <= LAYERS[src], f"{module} imports {target}: up from layer {LAYERS[src]} to {LAYERS[dst]}"
        assert (src, dst) not in INDEPENDENT, f"{module} imports {target}: {src}/ and {dst}/ stay independent"


def test_only_the_cli_imports_the_cli():
    offenders = [
        m
        for m, targets in GRAPH.items()
        if _part(m) not in ("cli", "__main__") and any(_part(t) == "cli" for t in targets)
    ]
    assert offenders == []


def test_no_import_cycles():
    # A module depends on a package by importing it: the package's __init__ is that module.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in GRAPH:
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted cycle and a planted upward import are caught."""
    planted = dict(GRAPH)
    planted["forgetful.tokens"] = GRAPH["forgetful.tokens"] | {"forgetful.nll"}
    planted["forgetful.nll"] = GRAPH["forgetful.nll"] | {"forgetful.tokens"}
    monkeypatch.setattr(__import__(__name__), "GRAPH", planted)
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()
    planted["forgetful.models.loading"] = GRAPH["forgetful.models.loading"] | {"forgetful.loss.trainer"}
    with pytest.raises(AssertionError, match="up from layer 1 to 2"):
        test_imports_walk_down_the_layers("forgetful.models.loading")


def test_no_module_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}, f"split these modules (at most 500 lines each): {long}"


def _private_crossings(path: Path) -> list[str]:
    """``from forgetful... import _name`` and ``module._name`` on an imported forgetful module."""
    found, modules = [], set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("forgetful")):
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.startswith("forgetful")}
    for node in ast.walk(tree):
        private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        if private and isinstance(node.value, ast.Name) and node.value.id in modules:
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_imported_across_modules():
    roots = [SRC, SRC.parents[1] / "tests", SRC.parents[1] / "benchmarks"]
    crossings = {str(p): c for root in roots for p in sorted(root.rglob("*.py")) if (c := _private_crossings(p))}
    assert crossings == {}


def test_the_private_name_checker_sees_a_crossing(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import forgetful.nll_kernels as k\nfrom forgetful.demo import _x\nk._secret(1)\n")
    assert _private_crossings(bad) == ["from forgetful.demo import _x", "k._secret"]


def test_forget_p_appears_only_at_the_seeds_public_functions():
    """One name for the share kept (``keep_ratio``): the share forgotten is taken only by
    ``reinforce_model`` / ``two_step_reinforce_model`` (converted once there) and, as
    ``forget_prob``, by the random baseline and ``create_random_forgetting_mask``."""
    import re

    users = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if re.search(r"\bforget_p\b", p.read_text())}
    assert users == {"input/reinforce.py", "cli/parsing.py"}  # parsing: the flag of earlier releases, read as --keep
