"""Which devices get a worker on this box.

Only a box with local workers asks, so torch is imported here lazily: an API process whose workers
are on other boxes (``--broker``) never loads it. No CUDA context is created either (that is the
workers' job, after spawn): devices are only counted. Their names come from the workers themselves.
"""

from __future__ import annotations

REAL_MODEL = "sdxl-lightning-8step"
CPU_MODEL = "tiny"


def _normalise(device: str) -> str:
    device = device.strip()
    if device.isdigit():
        return f"cuda:{device}"
    if device == "cuda":
        return "cuda:0"
    return device


def resolve_devices(devices: str, cpu_workers: int) -> tuple[str, ...]:
    """``auto``: one worker per CUDA device, or ``cpu_workers`` CPU workers without CUDA."""
    import torch

    if devices.strip() and devices.strip() != "auto":
        resolved = tuple(_normalise(d) for d in devices.split(",") if d.strip())
        for device in resolved:
            if device != "cpu" and not device.startswith("cuda:"):
                raise ValueError(f"unknown device {device!r}: use cuda:N, N or cpu")
            if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
                raise ValueError(f"{device} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return resolved
    if torch.cuda.is_available():
        return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    return ("cpu",) * cpu_workers


def resolve_model(model: str, devices: tuple[str, ...]) -> str:
    """``auto`` picks the real model on GPUs and the tiny one on CPUs."""
    if model != "auto":
        return model
    return REAL_MODEL if any(d.startswith("cuda") for d in devices) else CPU_MODEL
