"""Which devices get a worker on this box, found without importing torch.

The API process never loads torch (DESIGN.md section 3): importing it only to count GPUs cost the API
~190 MB of RSS on every box and, on a GPU box, CUDA state in a process that never runs a kernel. So
the count comes from NVML (the driver's management library, through ``nvidia-ml-py``), which creates
no CUDA context, filtered by ``CUDA_VISIBLE_DEVICES`` the way the CUDA runtime filters it, so that
worker ``cuda:N`` is the N-th device its own torch will see. Each worker still checks its device with
torch when it starts (``gpu_workers.worker``) and reports the name /health shows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

REAL_MODEL = "sdxl-lightning-8step"
CPU_MODEL = "tiny"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInventory:
    """What NVML sees: the UUIDs of whole GPUs (``GPU-...``, in NVML's index order, which is what
    indexes in ``CUDA_VISIBLE_DEVICES`` count) and of MIG devices (``MIG-...``). Only counts leave
    this module, so CUDA's own enumeration order (fastest first by default) does not matter. ``cuda_devices`` is what CUDA enumerates with no
    ``CUDA_VISIBLE_DEVICES``: a GPU in MIG mode shows as its MIG devices, any other as itself."""

    gpus: tuple[str, ...]
    migs: tuple[str, ...] = ()
    cuda_devices: tuple[str, ...] = ()


def read_nvml() -> GpuInventory | None:
    """The GPUs of this box from NVML, or None where there is no NVIDIA driver (no library, no
    driver loaded): then there is no CUDA device either."""
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py is a dependency; a trimmed install still runs on the CPU
        log.info("nvidia-ml-py is not installed: no CUDA device can be found (name them with --devices)")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("no NVIDIA driver here (NVML: %s): CPU workers", exc)
        return None
    try:
        gpus: list[str] = []
        migs: list[str] = []
        cuda_devices: list[str] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            gpu = _text(pynvml.nvmlDeviceGetUUID(handle))
            gpus.append(gpu)
            own_migs = _mig_uuids(pynvml, handle)
            migs.extend(own_migs)
            cuda_devices.extend(own_migs or [gpu])
        return GpuInventory(tuple(gpus), tuple(migs), tuple(cuda_devices))
    except pynvml.NVMLError as exc:
        log.warning("NVML could not list the GPUs (%s): CPU workers unless --devices names them", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _mig_uuids(pynvml, handle) -> list[str]:  # type: ignore[no-untyped-def]
    """The MIG devices of a GPU in MIG mode (none for a GPU not in MIG mode or a driver without MIG)."""
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError:
        return []
    if current != pynvml.NVML_DEVICE_MIG_ENABLE:
        return []
    uuids = []
    for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            uuids.append(_text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))))
        except pynvml.NVMLError:  # an empty slot
            continue
    return uuids


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def visible_cuda_count(inventory: GpuInventory | None, cuda_visible_devices: str | None) -> int:
    """How many devices CUDA will enumerate for a process with this ``CUDA_VISIBLE_DEVICES``.

    As the CUDA runtime reads it: unset means every device; otherwise a comma list of indexes, GPU
    UUIDs (``GPU-...``, a unique prefix is enough) or MIG UUIDs (``MIG-...``, also the older
    ``MIG-GPU-<uuid>/<gi>/<ci>`` form), and the list ends at its first entry that names no device
    (so ``""`` and ``-1`` hide every GPU)."""
    if inventory is None:
        return 0
    if cuda_visible_devices is None:
        return len(inventory.cuda_devices)
    count = 0
    for entry in cuda_visible_devices.split(","):
        if not _names_a_device(entry.strip(), inventory):
            break
        count += 1
    return count


def _names_a_device(entry: str, inventory: GpuInventory) -> bool:
    if entry.isdigit():
        return int(entry) < len(inventory.gpus)
    if entry.startswith("MIG-GPU-"):  # R450's form: MIG-GPU-<gpu uuid>/<gpu instance>/<compute instance>
        gpu = entry[len("MIG-") :].split("/", 1)[0]
        return gpu in inventory.gpus and entry.count("/") == 2
    if entry.startswith("MIG-"):
        return _one_prefix_match(entry, inventory.migs)
    if entry.startswith("GPU-"):
        return _one_prefix_match(entry, inventory.gpus)
    return False


def _one_prefix_match(prefix: str, uuids: tuple[str, ...]) -> bool:
    return len(prefix) > 4 and sum(uuid.startswith(prefix) for uuid in uuids) == 1


def _normalise(device: str) -> str:
    device = device.strip()
    if device.isdigit():
        return f"cuda:{device}"
    if device == "cuda":
        return "cuda:0"
    return device


def resolve_devices(devices: str, cpu_workers: int) -> tuple[str, ...]:
    """``auto``: one worker per visible CUDA device, or ``cpu_workers`` CPU workers without one.
    Named devices are checked against the visible count where NVML can tell it; where it cannot (no
    driver library on this box) the operator's word stands and each worker checks its own."""
    inventory = read_nvml()
    visible = visible_cuda_count(inventory, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if devices.strip() and devices.strip() != "auto":
        resolved = tuple(_normalise(d) for d in devices.split(",") if d.strip())
        for device in resolved:
            if device != "cpu" and not device.startswith("cuda:"):
                raise ValueError(f"unknown device {device!r}: use cuda:N, N or cpu")
            if device.startswith("cuda:") and not device[5:].isdigit():
                raise ValueError(f"unknown device {device!r}: use cuda:N, N or cpu")
            if device.startswith("cuda:") and inventory is not None and int(device[5:]) >= visible:
                raise ValueError(f"{device} does not exist: this machine has {visible} visible CUDA device(s)")
        return resolved
    if visible:
        return tuple(f"cuda:{i}" for i in range(visible))
    return ("cpu",) * cpu_workers


def resolve_model(model: str, devices: tuple[str, ...]) -> str:
    """``auto`` picks the real model on GPUs and the tiny one on CPUs."""
    if model != "auto":
        return model
    return REAL_MODEL if any(d.startswith("cuda") for d in devices) else CPU_MODEL
