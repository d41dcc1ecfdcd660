"""Custom pipelines loaded through the ``--model package.module:factory`` extension point.

They wrap the real tiny pipeline, so everything except the injected fault is the real thing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from gpu_workers.loading import load_pipeline

FAIL_NOW = "FAIL-NOW"
FAIL_LATE = "FAIL-LATE"
LATE_FAILURE_SECONDS = 1.5


class FailOnMarker:
    """A prompt containing FAIL-NOW fails at once; FAIL-LATE fails after a delay."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self.tokenizer = pipe.tokenizer

    def __call__(self, prompt: list[str], **kwargs: Any) -> Any:
        if any(FAIL_NOW in p for p in prompt):
            raise RuntimeError("deliberate failure for a test")
        if any(FAIL_LATE in p for p in prompt):
            time.sleep(LATE_FAILURE_SECONDS)
            raise RuntimeError("deliberate late failure for a test")
        return self._pipe(prompt=prompt, **kwargs)


def failing_tiny(device: str, model_cache: Path) -> FailOnMarker:
    return FailOnMarker(load_pipeline("tiny", device, model_cache))


CRASH = "CRASH"
HUGE = "HUGE"


class CrashOnMarker(FailOnMarker):
    """A prompt containing CRASH kills the worker process outright, like a segfault would."""

    def __call__(self, prompt: list[str], **kwargs: Any) -> Any:
        if any(CRASH in p for p in prompt):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(prompt, **kwargs)


class OutOfMemoryAboveOne:
    """Behaves like a GPU that fits one image at a time: a batch of more raises CUDA OOM, and a
    prompt containing HUGE does not fit even alone."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self.tokenizer = pipe.tokenizer

    def __call__(self, prompt: list[str], **kwargs: Any) -> Any:
        if len(prompt) > 1 or any(HUGE in p for p in prompt):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._pipe(prompt=prompt, **kwargs)


HANG = "HANG"


class HangOnMarker(FailOnMarker):
    """A prompt containing HANG never returns, like a stuck kernel or a deadlock would."""

    def __call__(self, prompt: list[str], **kwargs: Any) -> Any:
        if any(HANG in p for p in prompt):
            while True:
                time.sleep(60)
        return super().__call__(prompt, **kwargs)


def hanging_tiny(device: str, model_cache: Path) -> HangOnMarker:
    return HangOnMarker(load_pipeline("tiny", device, model_cache))


def crashing_tiny(device: str, model_cache: Path) -> CrashOnMarker:
    return CrashOnMarker(load_pipeline("tiny", device, model_cache))


def small_gpu_tiny(device: str, model_cache: Path) -> OutOfMemoryAboveOne:
    return OutOfMemoryAboveOne(load_pipeline("tiny", device, model_cache))


PACE_SECONDS = 1.0


class Paced:
    """Every shard takes a second longer, so that a browser test sees images arrive one by one and
    has time to reload the page in the middle of a job."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self.tokenizer = pipe.tokenizer

    def __call__(self, prompt: list[str], **kwargs: Any) -> Any:
        time.sleep(PACE_SECONDS)
        return self._pipe(prompt=prompt, **kwargs)


def paced_tiny(device: str, model_cache: Path) -> Paced:
    return Paced(load_pipeline("tiny", device, model_cache))
