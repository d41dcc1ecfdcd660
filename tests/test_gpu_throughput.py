"""The GPU window on the CPU, so that it does not rot before a GPU window comes: the whole window
rehearsed from a clean copy of the checkout (``scripts/gpu_window.py rehearse``: the plan's order,
its scaled-down budget, every arm of ``benchmarks/gpu_throughput.py --smoke`` with the tiny model,
the compiled arm bounded in its child process, the compile artifacts in the output folder), the
plan, the bounded child's heartbeat and abandonment, the output folder's rules, and the parts of
the wheel fetch that need no network."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_window_script():
    spec = importlib.util.spec_from_file_location("gpu_window", REPO / "scripts" / "gpu_window.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_window"] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def clean_copy(destination: Path) -> Path:
    """The checkout as a clone of it would be (tracked files and new ones git does not ignore; no
    .whl, no .gpu-cache, no build output), as the device tool sends it too."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if not source.is_file():  # (deleted in the working tree)
            continue
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination / name)
    return destination


def test_rehearsal_from_a_clean_copy_runs_the_window_in_the_plans_order(tmp_path: Path, model_cache: Path) -> None:
    clone, out = clean_copy(tmp_path / "clone"), tmp_path / "out"
    assert not (clone / ".whl").exists() and not (clone / ".gpu-cache").exists()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "scripts/gpu_window.py", "rehearse", str(out), "--model-cache", str(model_cache), "--target", str(tmp_path / "site")],
        cwd=clone, capture_output=True, text=True, timeout=900, env={**os.environ, "OUT": ""},
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "rehearsal: passed" in result.stdout
    data = json.loads((out / "gpu_throughput.json").read_text())
    rows = data["rows"]
    # the plan's order: the headline pair ((b) best batch, (d) server eager), then eager, then compiled
    assert [(row["arm"], row["batch"] if row["arm"] != "b" else "best") for row in rows] == [
        ("b", "best"), ("a", 1), ("d", 2), ("x", 2), ("x", 1), ("c", 2), ("c", 1), ("s", 2)
    ]  # fmt: skip
    assert [row["batch"] for row in data["plain_sweep"]] == [4, 2]  # largest batch first
    landed = [row["at_s"] for row in rows]
    assert landed == sorted(landed) and landed[2] <= 150  # the headline pair by the scaled 300 s
    assert not data["failed"] and not data["abandoned"] and list(data["skipped"]) == ["e"] and "CUDA" in data["skipped"]["e"]
    for row in rows:
        assert row["images"] > 0 and row["images_per_s"] > 0 and row["tflops"] > 0 and row["peak_memory_bytes"] > 0
        assert row["first_image_s"] is not None and row["warmup_s"] is not None
    assert all(row["psnr_db"] >= 40 for row in rows if row["arm"] in "dxcs")
    assert data["flops_per_image"] > 0 and data["peak_tflops_measured"] > 0
    reports = data["speed_reports"]
    assert reports["x"]["plan"]["compile"] == [] and reports["d"]["plan"]["compile"] == []  # eager
    assert reports["c"]["plan"]["compile"] == ["unet.time_embedding.linear_1"] and reports["c"]["graphs"] >= 1
    assert reports["s"]["plan"]["compile"] == ["unet.time_embedding.linear_1"] and reports["d"]["plan"]["fuse_qkv"]
    assert [check.split(":")[0] for check in data["checks"]] == ["PASS"] * 4
    # the compile's record and its artifacts, gzipped, in the output folder for the next window
    record = data["compile"]
    assert record["in_out"] and (out / (record["artifacts"] + ".gz")).is_file() and record["artifacts_gz_bytes"] < 16 * 2**20
    assert record.get("cold_ready_s") or record.get("warm_ready_s")
    # what the device tool brings back: at most 8 plain files
    names = sorted(path.name for path in out.iterdir())
    assert len(names) <= 8 and {"window.log", "versions.txt", "gpu_throughput.md", "server.log", "server-compiled.log"} <= set(names)
    log = (out / "window.log").read_text()
    assert "install: skipped (no .whl here" in log and "torch.compile on cpu: ok" in log
    assert json.loads((out / "versions.txt").read_text().split("\n}\n")[0] + "}")["service_from"].startswith(str(clone))
    steps = [line for line in log.splitlines() if line.split("] ", 1)[-1].startswith("| ")]
    assert [line.split("| ")[1].strip() for line in steps[2:5]] == ["install", "preflight", "plain diffusers: (b) batch sweep, largest first, then (a)"]
    assert "(c): " in result.stdout and "compiling" in result.stdout  # a heartbeat line while it compiled
    print(f"rehearsal from a clean copy: {seconds:.0f} s")


def test_plan_puts_the_headline_pair_before_any_compile_within_540_s() -> None:
    result = subprocess.run([sys.executable, "scripts/gpu_window.py", "plan"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    steps = [line for line in lines if line[:2].strip().isdigit()]
    names = [line[4:].split("  ")[0] for line in steps]
    headline = next(i for i, line in enumerate(steps) if "headline pair in $OUT" in line)
    assert names[headline].startswith("server over HTTP, eager") and names[headline - 1].startswith("plain diffusers")
    assert all("compile" not in name or "torch.compile" in name for name in names[:headline + 1])
    assert names.index(next(name for name in names if name.startswith("worker loop, compiled"))) > headline
    window = load_window_script()
    _, total, headline_at = window.plan_table()
    assert total <= 540 and headline_at <= 300
    totals = [int(line.split()[-1]) for line in steps if not line.rstrip().endswith("left over") and "<-" not in line]
    assert totals == sorted(totals) and f"total {total:.0f} s of 540 s" in result.stdout
    assert 'run(command="python3 scripts/gpu_window.py run", carry=[".whl", ".gpu-cache"], timeout_s=600); then give_back()' in result.stdout


def test_bounded_child_beats_and_is_abandoned_with_its_processes(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.gpu_throughput import run_bounded

    # a child that starts a grandchild (as a compile starts its workers) and outlives its limit
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('pid', flush=True); time.sleep(60)"
    started = time.monotonic()
    outcome = run_bounded([sys.executable, "-c", script], limit_s=2.5, heartbeat_s=0.5, status=lambda: "compiling: test", label="(t)")
    took = time.monotonic() - started
    assert outcome.abandoned and outcome.returncode is None and 2.5 <= outcome.seconds < took + 0.1
    printed = capsys.readouterr().out
    beats = [line for line in printed.splitlines() if "(t): " in line and "of at most 2 s: compiling: test" in line]
    assert len(beats) >= 3 and "abandoning it" in printed
    for _ in range(50):  # the grandchild goes with the group (a moment after its signal)
        leftovers = subprocess.run(["pgrep", "-f", "time.sleep(60)"], capture_output=True, text=True).stdout.split()
        if not leftovers:
            break
        time.sleep(0.1)
    assert not leftovers
    quick = run_bounded([sys.executable, "-c", "pass"], limit_s=30, heartbeat_s=10, status=lambda: "", label="(q)")
    assert quick.returncode == 0 and not quick.abandoned and quick.seconds < 30


def test_results_go_to_out_and_a_relative_folder_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    window = load_window_script()
    monkeypatch.setenv("OUT", str(tmp_path / "device-out"))
    assert window.out_folder(None) == (tmp_path / "device-out").resolve()
    assert window.out_folder(str(tmp_path / "here")) == (tmp_path / "here").resolve()
    with pytest.raises(SystemExit, match="relative folder"):
        window.out_folder("OUT")
    monkeypatch.chdir(tmp_path)
    assert window.out_folder("device-out") == (tmp_path / "device-out").resolve()  # the same folder as $OUT
    monkeypatch.delenv("OUT")
    with pytest.raises(SystemExit, match=r"\$OUT is not set"):
        window.out_folder(None)


def test_next_window_starts_from_the_carried_compile_cache(tmp_path: Path) -> None:
    import gzip

    window = load_window_script()
    cache_in, model_cache = tmp_path / ".gpu-cache", tmp_path / "models"
    cache_in.mkdir()
    (cache_in / "artifacts-0123456789abcdef.bin.gz").write_bytes(gzip.compress(b"compiled graphs"))
    (cache_in / "gpu_throughput.json").write_text(json.dumps({"compile": {"cold_ready_s": 200.0}}))
    log = window.Log(tmp_path / "window.log", time.monotonic())
    previous = window.bring_compile_cache(cache_in, model_cache, log)
    assert (model_cache / "torch-compile" / "artifacts-0123456789abcdef.bin").read_bytes() == b"compiled graphs"
    assert previous == cache_in / "gpu_throughput.json"
    assert window.bring_compile_cache(tmp_path / "absent", model_cache, log) is None


def test_fallback_group_carries_what_the_boxs_versions_may_not_satisfy() -> None:
    from packaging.requirements import Requirement

    window = load_window_script()
    assert {"huggingface-hub", "tokenizers", "transformers"} <= set(window.FALLBACK_PACKAGES)
    lacks = {text: window.box_lacks(Requirement(text)) for text in (
        "httpx2<3,>=2.0.0", "click<9.0.0,>=8.4.2", "numpy>=1.17", "tokenizers<0.24.0,>=0.23.1", "huggingface-hub<3.0,>=1.34",
        "pyyaml>=5.1", "filelock", "hf-xet<2.0.0,>=1.6.0",
    )}  # fmt: skip
    assert lacks == {
        "httpx2<3,>=2.0.0": True,  # not on the box
        "click<9.0.0,>=8.4.2": True,  # on the box, version unknown, bounded
        "numpy>=1.17": False,  # the box's 2.5.2 does
        "tokenizers<0.24.0,>=0.23.1": False,  # the box's 0.23.2 does
        "huggingface-hub<3.0,>=1.34": True,  # the box's 1.33.0 does not
        "pyyaml>=5.1": True,
        "filelock": False,  # any version does
        "hf-xet<2.0.0,>=1.6.0": False,  # downloads only: never carried
    }


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
    window.main(["run", "--scale", "0.5", "--", "--max-batch", "1,8", "--compile", "unet"])
    args = seen["args"]
    assert (args.out, args.scale, args.extra) == (None, 0.5, ["--max-batch", "1,8", "--compile", "unet"])
