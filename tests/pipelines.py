"""Custom pipelines loaded through the ``--model package.module:factory`` extension point.

They wrap the real tiny pipeline, so everything except the injected fault is the real thing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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
