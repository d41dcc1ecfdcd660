"""Devices are found without torch: NVML's inventory filtered by CUDA_VISIBLE_DEVICES as the CUDA
runtime filters it, and a real server with local workers whose API process never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from gpu_workers import devices
from gpu_workers.devices import GpuInventory, resolve_devices, visible_cuda_count
from tests.server_process import REPO, ServerProcess

TWO_GPUS = GpuInventory(gpus=("GPU-1111aaaa-0000", "GPU-2222bbbb-0000"), cuda_devices=("GPU-1111aaaa-0000", "GPU-2222bbbb-0000"))
MIG_GPU = GpuInventory(
    gpus=("GPU-3333cccc-0000",),
    migs=("MIG-4444dddd-0000", "MIG-5555eeee-0000"),
    cuda_devices=("MIG-4444dddd-0000", "MIG-5555eeee-0000"),
)


@pytest.mark.parametrize(
    ("inventory", "cuda_visible_devices", "count"),
    [
        (TWO_GPUS, None, 2),  # unset: every device
        (TWO_GPUS, "", 0),  # set but empty hides every GPU
        (TWO_GPUS, "-1", 0),
        (TWO_GPUS, "1", 1),
        (TWO_GPUS, "1,0", 2),
        (TWO_GPUS, "0,7,1", 1),  # the list ends at its first entry that names no device
        (TWO_GPUS, "GPU-2222bbbb-0000", 1),
        (TWO_GPUS, "GPU-2222", 1),  # a unique prefix is enough
        (TWO_GPUS, "GPU-", 0),  # a prefix of both names neither
        (TWO_GPUS, "GPU-9999", 0),
        (TWO_GPUS, " 0 , 1 ", 2),
        (MIG_GPU, None, 2),  # a GPU in MIG mode shows as its MIG devices
        (MIG_GPU, "MIG-5555eeee-0000", 1),
        (MIG_GPU, "MIG-4444,MIG-5555", 2),
        (MIG_GPU, "MIG-GPU-3333cccc-0000/1/0", 1),  # R450's form
        (MIG_GPU, "MIG-GPU-3333cccc-0000", 0),
        (None, None, 0),  # no NVIDIA driver: no CUDA device whatever the variable says
        (None, "0,1", 0),
    ],
)
def test_visible_cuda_count(inventory: GpuInventory | None, cuda_visible_devices: str | None, count: int) -> None:
    assert visible_cuda_count(inventory, cuda_visible_devices) == count


def test_auto_uses_every_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "read_nvml", lambda: TWO_GPUS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2222")
    assert resolve_devices("auto", 3) == ("cuda:0",)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert resolve_devices("auto", 3) == ("cuda:0", "cuda:1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_devices("auto", 3) == ("cpu", "cpu", "cpu")


def test_named_devices_are_checked_where_nvml_can_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "read_nvml", lambda: TWO_GPUS)
    assert resolve_devices("1,cuda:0", 1) == ("cuda:1", "cuda:0")
    with pytest.raises(ValueError, match="cuda:2 does not exist: this machine has 2 visible CUDA device"):
        resolve_devices("cuda:2", 1)
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_devices("gpu0", 1)
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        resolve_devices("cuda:x", 1)
    # No driver library here to ask: the operator's word stands, and the worker checks with torch.
    monkeypatch.setattr(devices, "read_nvml", lambda: None)
    assert resolve_devices("cuda:3", 1) == ("cuda:3",)


def test_this_box_without_a_driver_gets_cpu_workers_and_no_torch() -> None:
    """In a fresh interpreter: NVML finds no driver here, and counting loaded no torch."""
    code = (
        "import sys; from gpu_workers.devices import read_nvml, resolve_devices; "
        "print(read_nvml(), resolve_devices('auto', 2), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["None", "('cpu',", "'cpu')", "False"]


def _probe_server(workdir: Path, model_cache: Path, record: Path, watched: str, *args: str) -> ServerProcess:
    return ServerProcess(
        workdir,
        ["--model-cache", str(model_cache), *args],
        {},
        launcher=(str(REPO / "tests" / "import_probe.py"), str(record), watched, "service"),
    )


def test_the_probe_sees_what_the_api_process_imports(tmp_path: Path, model_cache: Path) -> None:
    """The watcher itself works: the server's own --help imports aiohttp, and the probe says so."""
    record = tmp_path / "imports.txt"
    server = _probe_server(tmp_path, model_cache, record, "aiohttp,torch", "--help")
    done = subprocess.run(server.args[:5] + ["--help"], cwd=tmp_path, env=server.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--devices" in done.stdout
    assert record.read_text().split() == ["aiohttp"]


def test_the_api_process_with_local_workers_loads_no_torch(tmp_path: Path, model_cache: Path) -> None:
    """A real server, default devices (auto: one CPU worker here): the workers load torch and
    diffusers, the API process that spawned them and served a batch never imports either."""
    record = tmp_path / "imports.txt"
    server = _probe_server(tmp_path, model_cache, record, "torch,diffusers,transformers", "--model", "tiny", "--workers", "1")
    server.start()
    try:
        answer = requests.post(server.url + "/generate", json={"prompts": ["a lighthouse"], "seed": 7}, timeout=120)
        assert answer.status_code == 200 and answer.json()["count"] == 1
        health = server.health()
        assert health["workers"][0]["device"] == "cpu" and health["workers"][0]["state"] in ("ready", "busy")
        worker_pid = health["workers"][0]["pid"]
        api_maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        worker_maps = Path(f"/proc/{worker_pid}/maps").read_text()
        assert "libtorch" in worker_maps  # the check below looks in the right place
        assert "libtorch" not in api_maps
    finally:
        assert server.stop() == 0
    assert record.read_text() == "", f"the API process imported {record.read_text().split()}"


def test_a_worker_given_a_device_torch_cannot_see_says_what_to_fix(tmp_path: Path, model_cache: Path) -> None:
    """No driver library here, so --devices cuda:0 stands at start; the worker's own torch check
    then fails it with the cause and the fix, and /health shows it."""
    server = ServerProcess(tmp_path, ["--model-cache", str(model_cache), "--model", "tiny", "--devices", "cuda:0"], {})
    server.start(healthy=False)
    try:
        health = server.wait_for(lambda h: h["workers"][0]["state"] == "failed", timeout=120, what="the worker's start failure")
        error = health["workers"][0]["error"]
        assert "cuda:0 is not a CUDA device this worker can use" in error
        assert "fix --devices or CUDA_VISIBLE_DEVICES" in error
    finally:
        server.stop()
