"""benchmarks/gpu_throughput.py --smoke (every arm, on the CPU with the tiny model) and the parts of
scripts/gpu_window.py that need no network, so that neither rots before a GPU window comes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_window_script():
    spec = importlib.util.spec_from_file_location("gpu_window", REPO / "scripts" / "gpu_window.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_runs_every_arm(tmp_path: Path, model_cache: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_throughput", "--smoke", "--out", str(out), "--model-cache", str(model_cache)],
        cwd=REPO, capture_output=True, text=True, timeout=240, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "gpu_throughput.json").read_text())
    rows = data["rows"]
    assert [(row["arm"], row["batch"] if row["arm"] != "b" else "best") for row in rows] == [
        ("a", 1), ("b", "best"), ("x", 2), ("c", 1), ("c", 2), ("d", 2)
    ]  # fmt: skip
    assert [row["batch"] for row in data["plain_sweep"]] == [2, 4]
    assert not data["failed"] and list(data["skipped"]) == ["e"] and "CUDA" in data["skipped"]["e"]  # fp8: no GPU here
    for row in rows:
        assert row["images"] > 0 and row["images_per_s"] > 0 and row["tflops"] > 0 and row["peak_memory_bytes"] > 0
        assert row["first_image_s"] is not None and row["warmup_s"] is not None
    assert all(row["psnr_db"] >= 40 for row in rows if row["arm"] in "cd")
    assert data["flops_per_image"] > 0 and data["peak_tflops_measured"] > 0
    assert data["speed_reports"]["c"]["plan"]["channels_last"] and data["speed_reports"]["d"]["plan"]["fuse_qkv"]
    assert [check.split(":")[0] for check in data["checks"]] == ["PASS", "PASS"]
    table = (out / "gpu_throughput.md").read_text()
    assert "| d | server over HTTP |" in table and (out / "server.log").is_file()


def test_window_script_carries_what_the_box_lacks_at_the_pinned_versions() -> None:
    window = load_window_script()
    pins = window.setup_pins()
    assert pins["diffusers"] == "0.42.1" and pins["aiohttp-apigami"] == "0.9.0" and pins["marshmallow"] == "3.26.2"
    assert "torch" not in pins  # a range: the box keeps its CUDA build
    lacking = {name for name in pins if name not in window.BOX_PACKAGES}
    assert {"diffusers", "marshmallow", "aiohttp-apigami"} <= lacking
    assert not lacking & {"torch", "transformers", "accelerate", "safetensors", "numpy"}
    imported = window.imported_distributions()
    assert imported["diffusers"] == "diffusers" and imported["PIL"] == "pillow" and "json" not in imported


def test_window_script_reads_a_wheels_needs_for_the_box(tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(
            "demo-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\nRequires-Dist: apispec<7,>=5\n"
            'Requires-Dist: tomli; python_version < "3.11"\nRequires-Dist: pytest; extra == "test"\n'
            'Requires-Dist: lazy-importer>=0.1; python_version < "3.15"\n',
        )
    assert load_window_script().wheel_requirements(wheel) == ["apispec", "lazy-importer"]


def test_window_script_splits_the_benchmarks_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    window = load_window_script()
    seen = {}
    monkeypatch.setattr(window, "run", lambda args: seen.setdefault("args", args) and 0)
    window.main(["run", "/tmp/out", "--budget-s", "300", "--", "--max-batch", "1,8"])
    args = seen["args"]
    assert (args.out, args.budget_s, args.extra) == ("/tmp/out", 300.0, ["--max-batch", "1,8"])
