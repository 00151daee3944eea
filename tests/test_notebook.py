"""The evaluation notebook runs top to bottom on a tiny model (so it never rots)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "evaluate_forgetting.ipynb"

pytestmark = pytest.mark.slow


def test_the_evaluation_notebook_runs(tiny_model_dir, tiny_llama, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from forgetful.input.policies import MLPForgetMask

    model, _ = tiny_llama
    MLPForgetMask(model, hidden_size=8).save_pretrained(tmp_path / "policy")
    monkeypatch.setenv("FORGETFUL_NB_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("FORGETFUL_NB_POLICIES", str(tmp_path / "policy"))
    monkeypatch.setenv("FORGETFUL_NB_EXAMPLES", "8")
    monkeypatch.setenv("FORGETFUL_NB_KEEPS", "1,0.5")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(NOTEBOOK.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(
        o.get("text", "") or str(o.get("data", {}).get("text/plain", "")) for out in outputs.values() for o in out
    )
    assert "8 held-out examples" in text and "policy (MLPForgetMask)" in text
    assert "recency" in text and "self_information" in text  # the table
    assert any("image/png" in o.get("data", {}) for out in outputs.values() for o in out)  # the plot
    assert "policy: " in text  # the kept tokens of one example
