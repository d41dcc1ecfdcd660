"""The Kaggle/Colab quick start (examples/kaggle_quickstart.ipynb) runs, so it cannot rot: executed
by nbclient on this CPU with the tiny model and the tunnel step off, every cell as a user runs it."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.server_process import REPO, free_port

NOTEBOOK = REPO / "examples" / "kaggle_quickstart.ipynb"


def test_the_quickstart_notebook_runs_on_the_cpu(tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_QUICKSTART_REPO", str(REPO))
    monkeypatch.setenv("SDXL_QUICKSTART_MODEL", "tiny")
    monkeypatch.setenv("SDXL_QUICKSTART_PORT", str(free_port()))
    monkeypatch.setenv("SDXL_QUICKSTART_TUNNEL", "off")
    monkeypatch.setenv("SDXL_MODEL_CACHE", str(model_cache))
    monkeypatch.delenv("SDXL_API_KEY", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs)
    assert "ready after" in text and "API key:" in text
    assert "no tunnel" in text
    shots = sorted(path.name for path in (tmp_path / "shots").glob("*.jpg"))
    assert shots == ["000_castle-at-dawn_4242.jpg", "001_the-knight_11.jpg", "002_the-dragon_12.jpg"]
    shown = [output for output in outputs if "image/jpeg" in output.get("data", {})]
    assert len(shown) == 3  # the images inline, as the notebook shows them
    assert "server exited with 0" in text
