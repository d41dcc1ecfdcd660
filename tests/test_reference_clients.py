"""The reference description's client examples, copied verbatim, run against a live server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REFERENCE_PORT
from tests.server_process import ServerProcess

CLIENTS = Path(__file__).parent / "reference_clients"


def test_python_requests_example_saves_pngs(server: ServerProcess, tmp_path: Path) -> None:
    if server.port != REFERENCE_PORT:
        pytest.skip(f"port {REFERENCE_PORT} was taken when the server started; the example hard-codes it")
    result = subprocess.run(
        [sys.executable, str(CLIENTS / "python_requests.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Saved output_0.png" in result.stdout
    with Image.open(tmp_path / "output_0.png") as image:
        assert image.size == (1024, 576)
        assert image.format == "PNG"
